//! The workloads the benchmarks time, run as hidden xtask tasks so that
//! their processes are not the benchmark's own: `xtask storm
//! process|thread|kill|kill-filtered N WORKERS [RATE]` and `xtask pingpong N`.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Hidden task the benchmarks run as their workload: `xtask storm process|thread N WORKERS`;
/// the kill storms take a RATE (signals per second per worker, 0 or none:
/// as fast as one core sends them).
pub fn storm(args: &[String]) -> Result<ExitCode> {
    let kind = args.first().map(String::as_str).unwrap_or("");
    let n: u32 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .context("storm needs a count")?;
    let workers: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let rate: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let per = n / workers;
    let mut pids = vec![];
    for _ in 0..workers {
        // SAFETY: the worker only forks, waits and exits, or spawns threads.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            match kind {
                "process" => process_storm(per),
                "kill" => kill_storm(per, libc::SIGUSR1, rate),
                "kill-filtered" => kill_storm(per, libc::SIGURG, rate),
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

pub(crate) fn process_storm(n: u32) {
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
/// SIGURG's is not (the probe filters it in the kernel). With a `rate`, the
/// signals are paced to it (in bursts of 64), so that a tracer whose reader
/// is slower than one core's kill loop can keep up with it.
pub(crate) fn kill_storm(n: u32, sig: i32, rate: u32) {
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
    let start = Instant::now();
    for i in 0..n {
        if rate > 0 && i % 64 == 0 {
            let due = Duration::from_secs_f64(f64::from(i) / f64::from(rate));
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        // SAFETY: our own child.
        unsafe { libc::kill(c, sig) };
    }
    unsafe {
        libc::kill(c, libc::SIGKILL);
        libc::waitpid(c, std::ptr::null_mut(), 0);
    }
}

pub(crate) fn thread_storm(n: u32) {
    for _ in 0..n {
        let _ = std::thread::spawn(|| {}).join();
    }
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
