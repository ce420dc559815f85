//! What every tracer benchmark shares: starting a tracer (podscope, bpftrace
//! or a libbpf-tools peer) and waiting until it has attached, stopping it
//! with its CPU, memory and the kernel's per-program statistics, and the
//! workloads' timing.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{build_podscope, setup};

/// Rounds per condition; conditions alternate within each round.
pub const ROUNDS: usize = 7;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Tracer {
    None,
    Podscope,
    BpftraceCount,
    BpftracePrint,
    /// `podscope trace throttle`: the sched_switch probe.
    PodscopeThrottle,
    /// A do-nothing bpftrace program on sched_switch: the floor of what the
    /// kernel's per-program accounting reports for any program there.
    BpftraceEmptySwitch,
    /// A libbpf-tools program (Debian's `libbpf-tools`): CO-RE C, the tool an
    /// operator reaches for instead.
    Peer(Peer),
}

/// A libbpf-tools program and its arguments.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Peer {
    pub(crate) name: &'static str,
    pub(crate) args: &'static [&'static str],
}

impl Peer {
    pub(crate) fn path(self) -> std::path::PathBuf {
        Path::new("/usr/sbin").join(self.name)
    }
}

impl Tracer {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Tracer::None => "no tracer",
            Tracer::Podscope => "podscope",
            Tracer::BpftraceCount => "bpftrace count()",
            Tracer::BpftracePrint => "bpftrace printf",
            Tracer::PodscopeThrottle => "podscope throttle",
            Tracer::BpftraceEmptySwitch => "bpftrace empty",
            Tracer::Peer(p) => p.name,
        }
    }
}

pub(crate) struct Running {
    pub(crate) child: Child,
    pub(crate) stderr: mpsc::Receiver<String>,
    /// CPU the tracer had used once attached (start-up is not the workload's cost).
    pub(crate) cpu_at_ready: Duration,
    /// The BPF programs this tracer loaded.
    pub(crate) progs: Vec<u32>,
}

/// What a benchmark traces: podscope's family and the same hook for bpftrace.
pub(crate) struct Traced {
    pub(crate) family: &'static str,
    pub(crate) bpftrace_count: &'static str,
    pub(crate) bpftrace_print: &'static str,
}

pub(crate) const EXITS: Traced = Traced {
    family: "exits",
    bpftrace_count: "tracepoint:sched:sched_process_exit { @exits = count(); }",
    bpftrace_print: "tracepoint:sched:sched_process_exit { printf(\"%d %d %s\\n\", pid, tid, comm); }",
};

pub(crate) const SIGNALS: Traced = Traced {
    family: "signals",
    bpftrace_count: "tracepoint:signal:signal_generate { @signals = count(); }",
    bpftrace_print: "tracepoint:signal:signal_generate { printf(\"%d %s -> %d %d %d\\n\", pid, comm, args->pid, args->sig, args->result); }",
};

/// Starts a tracer and returns once it has attached.
pub(crate) fn start(tracer: Tracer, podscope: &Path) -> Result<Option<Running>> {
    start_on(tracer, podscope, &EXITS)
}

pub(crate) fn start_on(
    tracer: Tracer,
    podscope: &Path,
    traced: &Traced,
) -> Result<Option<Running>> {
    let mut cmd = match tracer {
        Tracer::None => return Ok(None),
        Tracer::Podscope => {
            // As a user runs it: the default rings (512 KiB per CPU),
            // which are also most of its resident memory.
            let mut c = Command::new(podscope);
            c.args([
                "trace",
                traced.family,
                "-o",
                "json",
                "--log",
                "podscope=debug",
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
        Tracer::Peer(p) => {
            let mut c = Command::new(p.path());
            c.args(p.args);
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
    let ready_tx_peer = ready_tx.clone();
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
    // libbpf-tools print their header into a pipe's buffer, not at once:
    // they are attached when their programs appear in the kernel.
    if let Tracer::Peer(_) = tracer {
        let tx = ready_tx_peer;
        let before: Vec<u32> = before.iter().map(|(id, _)| *id).collect();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let now = bpf_prog_stats().unwrap_or_default();
                if now.iter().any(|(id, _)| !before.contains(id)) {
                    let _ = tx.send(());
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    }
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

pub(crate) struct Stopped {
    pub(crate) hwm_kib: u64,
    pub(crate) rss_kib: u64,
    /// Kernel time in the tracer's programs, and how often they ran.
    pub(crate) prog_ns: u64,
    pub(crate) prog_runs: u64,
    /// The same per program: (name, ns, runs).
    pub(crate) programs: Vec<(String, u64, u64)>,
    pub(crate) cpu: Duration,
    pub(crate) stderr: String,
}

pub(crate) fn stop(mut r: Running) -> Result<Stopped> {
    let pid = r.child.id();
    let hwm_kib = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let rss_kib = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let programs: Vec<(String, u64, u64)> = bpf_prog_names()?
        .into_iter()
        .filter(|(id, ..)| r.progs.contains(id))
        .map(|(_, name, ns, runs)| (name, ns, runs))
        .collect();
    let (prog_ns, prog_runs) = programs
        .iter()
        .fold((0, 0), |(ns, n), (_, t, c)| (ns + t, n + c));
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
        programs,
        cpu,
        stderr,
    })
}

/// Every loaded BPF program's id with its (run_time_ns, run_cnt), as the
/// kernel counts them while `kernel.bpf_stats_enabled` is 1.
pub(crate) fn bpf_prog_stats() -> Result<Vec<(u32, (u64, u64))>> {
    Ok(bpf_prog_names()?
        .into_iter()
        .map(|(id, _, ns, runs)| (id, (ns, runs)))
        .collect())
}

/// The same with each program's name: (id, name, run_time_ns, run_cnt).
pub(crate) fn bpf_prog_names() -> Result<Vec<(u32, String, u64, u64)>> {
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
                    Some((
                        p["id"].as_u64()? as u32,
                        p["name"].as_str().unwrap_or("?").to_string(),
                        p["run_time_ns"].as_u64().unwrap_or(0),
                        p["run_cnt"].as_u64().unwrap_or(0),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Turns the kernel's per-program statistics on for the benchmark's
/// duration, and back to what they were when dropped.
pub(crate) struct BpfStats(String);

impl BpfStats {
    pub(crate) fn enable() -> Result<BpfStats> {
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

pub(crate) fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU time (user and system) of this process's children that ended and
/// were waited for: read before and after a workload, the difference is the
/// workload's own CPU, kernel work done on its behalf included (what a
/// tracer's hooks add to it, whatever the kernel's per-program statistics
/// leave out: a plain tracepoint's record, wakeups).
pub(crate) fn children_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub(crate) fn proc_cpu(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

pub(crate) fn workload(kind: &str, n: u32, workers: u32) -> Result<Duration> {
    workload_at(kind, n, workers, 0)
}

/// `workload`, a kill storm paced to `rate` signals a second per worker
/// (0: as fast as it goes).
pub(crate) fn workload_at(kind: &str, n: u32, workers: u32, rate: u32) -> Result<Duration> {
    let me = std::env::current_exe()?;
    let t = Instant::now();
    let st = Command::new(me)
        .args([
            "storm",
            kind,
            &n.to_string(),
            &workers.to_string(),
            &rate.to_string(),
        ])
        .status()?;
    if !st.success() {
        bail!("the {kind} storm failed ({st})");
    }
    Ok(t.elapsed())
}

/// podscope against no tracer and bpftrace's cheapest and like-for-like forms.
pub(crate) const TRACERS: [Tracer; 4] = [
    Tracer::None,
    Tracer::Podscope,
    Tracer::BpftraceCount,
    Tracer::BpftracePrint,
];

/// Set-up, a release podscope, tracefs for bpftrace (whether this mounted
/// it), and the kernel's per-program statistics on while the guard lives.
pub(crate) fn prepare_tracer_bench() -> Result<(PathBuf, bool, BpfStats)> {
    setup::run()?;
    let podscope = build_podscope()?;
    let mounted_tracefs = ensure_tracefs()?;
    Ok((podscope, mounted_tracefs, BpfStats::enable()?))
}

pub(crate) fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// bpftrace attaches plain tracepoints through tracefs.
pub(crate) fn ensure_tracefs() -> Result<bool> {
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

pub(crate) fn unmount_tracefs() {
    let _ = Command::new("umount")
        .arg("/sys/kernel/tracing")
        .stderr(Stdio::null())
        .status();
}

pub(crate) fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let st = cmd.stdout(Stdio::null()).status()?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(t.elapsed())
}
