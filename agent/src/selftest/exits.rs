//! Exit tracing against real processes: codes, signals, core dumps, threads,
//! every hook, and a storm where every exit is either seen or counted lost.

use std::{
    os::unix::process::ExitStatusExt,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use super::{Context, Stop, Tracer, Verdict, ensure, ensure_eq, fail, helper};
use crate::probes::{AttachType, exits::Exit};

/// How long an event may take to show up.
const WAIT: Duration = Duration::from_secs(10);
const RING: u32 = 1 << 20;

/// Spawns `cmd`, lets `act` do something to it, reaps it, and returns the
/// process's exit event with the wait status the parent saw.
fn exit_of(
    tracer: &mut Tracer,
    cmd: &mut Command,
    act: impl FnOnce(u32) -> Result<(), Stop>,
) -> Result<(Exit, ExitStatus), Stop> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Stop::Fail(format!("cannot start {cmd:?}: {e}")))?;
    let pid = child.id();
    let acted = act(pid);
    if acted.is_err() {
        let _ = child.kill();
    }
    let status = child.wait()?;
    acted?;
    let Some(exit) = tracer.wait_for(WAIT, |e| e.tgid == pid && !e.thread) else {
        fail!("no exit event for pid {pid} ({status}) within {WAIT:?}")
    };
    Ok((exit, status))
}

/// Sends `sig` to our own child once it runs `sleep` (its comm says so:
/// the exec is done), so that the event names the program, not the fork.
fn signal(pid: u32, sig: i32) -> Result<(), Stop> {
    let deadline = std::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep") {
        if std::time::Instant::now() > deadline {
            fail!("pid {pid} did not exec `sleep` within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: pid is our own child, not yet reaped.
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        fail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// cgroup v2 id of this process: the inode of its v2 cgroup directory.
fn own_cgroup_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let layout = crate::kernel::cgroups::CgroupLayout::current();
    let root = layout.v2_root()?.clone();
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    std::fs::metadata(root.join(rel.trim_start_matches('/')))
        .ok()
        .map(|m| m.ino())
}

/// A normal exit with status 3, and every field of its event.
pub fn exit_code_3(_: &Context) -> Verdict {
    let mut t = Tracer::attach(None, RING)?;
    let (e, status) = exit_of(
        &mut t,
        Command::new("sh").args(["-c", "exit 3"]),
        |_| Ok(()),
    )?;
    ensure_eq!(status.code(), Some(3), "wait status");
    ensure_eq!(e.exit_code, Some(3), "exit_code");
    ensure_eq!(e.signal, None, "signal");
    ensure!(
        !e.core_dumped && !e.thread && !e.partial,
        "flags wrong: {e:?}"
    );
    ensure_eq!(e.comm.as_str(), "sh", "comm");
    ensure_eq!(e.ppid, std::process::id(), "ppid");
    ensure_eq!(e.pid, e.tgid, "pid of a main thread");
    ensure!(
        e.lifetime_ns > 0 && e.lifetime() < Duration::from_secs(10),
        "lifetime {:?} is implausible",
        e.lifetime()
    );
    if let Some(id) = own_cgroup_id() {
        ensure_eq!(e.cgroup_id, id, "cgroup id (the child lives in our cgroup)");
    }
    // The offset shows that each kernel's own BTF was used: it differs between kernels.
    Ok(format!(
        "exit_code=3 via {} (task_struct.exit_code at {}), lifetime {:?}",
        t.probe.attachment.attach_type,
        t.offsets.exits.task_exit_code,
        e.lifetime()
    ))
}

fn killed_by(sig: i32, name: &str) -> Verdict {
    let mut t = Tracer::attach(None, RING)?;
    let (e, status) = exit_of(&mut t, Command::new("sleep").arg("30"), |pid| {
        signal(pid, sig)
    })?;
    ensure_eq!(status.signal(), Some(sig), "wait status signal");
    ensure_eq!(e.signal.as_deref(), Some(name), "signal");
    ensure_eq!(e.exit_code, None, "exit_code");
    ensure_eq!(e.comm.as_str(), "sleep", "comm");
    Ok(format!("signal={name}"))
}

pub fn sigkill(_: &Context) -> Verdict {
    killed_by(libc::SIGKILL, "SIGKILL")
}

pub fn default_sigterm(_: &Context) -> Verdict {
    killed_by(libc::SIGTERM, "SIGTERM")
}

/// A real invalid memory access; the core flag must match what the parent
/// saw, whatever the system's core settings decided.
pub fn sigsegv_core_flag(_: &Context) -> Verdict {
    let mut t = Tracer::attach(None, RING)?;
    // Core files, if the settings write any, land in a scratch directory.
    let scratch = std::env::temp_dir().join(format!("podscope-core-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let Some(scratch_c) = scratch
        .to_str()
        .and_then(|s| std::ffi::CString::new(s).ok())
    else {
        fail!(
            "temporary directory {} is not a C string",
            scratch.display()
        )
    };
    // SAFETY: the child only calls async-signal-safe functions before it faults.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            libc::chdir(scratch_c.as_ptr());
            std::ptr::write_volatile(std::ptr::null_mut::<u8>(), 1);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: pid is our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let e = t.wait_for(WAIT, |e| e.tgid == pid as u32 && !e.thread);
    let _ = std::fs::remove_dir_all(&scratch);
    let Some(e) = e else {
        fail!("no exit event for the crash")
    };
    ensure!(
        libc::WIFSIGNALED(status),
        "the child was not killed by a signal ({status:#x})"
    );
    ensure_eq!(libc::WTERMSIG(status), libc::SIGSEGV, "wait status signal");
    ensure_eq!(e.signal.as_deref(), Some("SIGSEGV"), "signal");
    ensure_eq!(
        e.core_dumped,
        libc::WCOREDUMP(status),
        "core flag (must match what the parent saw)"
    );
    Ok(format!("signal=SIGSEGV core_dumped={}", e.core_dumped))
}

/// A thread ending inside a live process is a thread exit, and the process
/// gets no event of its own.
pub fn lone_thread_exit(_: &Context) -> Verdict {
    let mut t = Tracer::attach(None, RING)?;
    let tid = std::thread::Builder::new()
        .name("podscope-short".into())
        // SAFETY: gettid has no preconditions.
        .spawn(|| unsafe { libc::gettid() } as u32)?
        .join()
        .map_err(|_| Stop::Fail("the short thread panicked".into()))?;
    let me = std::process::id();
    let Some(e) = t.wait_for(WAIT, |e| e.pid == tid) else {
        fail!("no exit event for thread {tid}")
    };
    ensure!(
        e.thread,
        "a lone thread's exit is reported as a process exit: {e:?}"
    );
    ensure_eq!(e.tgid, me, "tgid");
    ensure_eq!(e.comm.as_str(), "podscope-short", "comm");
    ensure_eq!(e.exit_code, Some(0), "exit_code");
    ensure!(
        t.wait_for(Duration::from_millis(200), |e| e.tgid == me && !e.thread)
            .is_none(),
        "a process-exit event for this live process"
    );
    Ok("thread:true".into())
}

/// Four threads asleep when the process exits with 7: one event, the process's.
pub fn multithreaded_process_exit(ctx: &Context) -> Verdict {
    let mut t = Tracer::attach(None, RING)?;
    let mut cmd = Command::new(&ctx.helper);
    cmd.args(["--helper", helper::THREADS_THEN_EXIT]);
    let (e, status) = exit_of(&mut t, &mut cmd, |_| Ok(()))?;
    let want = i32::from(helper::THREADS_THEN_EXIT_STATUS);
    ensure_eq!(status.code(), Some(want), "wait status");
    ensure_eq!(
        e.exit_code,
        Some(helper::THREADS_THEN_EXIT_STATUS),
        "exit_code"
    );
    ensure!(!e.thread, "reported as a thread exit: {e:?}");
    let pid = e.tgid;
    // A marker process started after the wait: every thread of `pid` had
    // ended before it, and the ring buffer is read in order, so an event of
    // those threads would come before the marker's exit.
    let mut marker = Command::new("sh").args(["-c", "exit 0"]).spawn()?;
    let marker_pid = marker.id();
    marker.wait()?;
    let extra = std::cell::Cell::new(0u32);
    let seen = t.wait_for(WAIT, |x| {
        extra.set(extra.get() + u32::from(x.tgid == pid));
        x.tgid == marker_pid && !x.thread
    });
    ensure!(
        seen.is_some(),
        "no exit event for the marker process {marker_pid}"
    );
    ensure_eq!(
        extra.get(),
        0,
        "events from threads torn down with their process"
    );
    Ok(format!("one event, exit_code={want}"))
}

/// A forced hook works like the best one.
fn forced(kind: AttachType, code: u8) -> Verdict {
    let was_mounted = crate::kernel::tracefs::mounted().is_some();
    let mut t = Tracer::attach(Some(kind), RING)?;
    ensure_eq!(t.probe.attachment.attach_type, kind, "attach type");
    let script = format!("exit {code}");
    let r = exit_of(&mut t, Command::new("sh").args(["-c", &script]), |_| Ok(()));
    drop(t);
    if !was_mounted && crate::kernel::tracefs::mounted().is_some() {
        // We mounted tracefs for this scenario: leave the machine as we found it.
        // SAFETY: a constant NUL-terminated path.
        unsafe { libc::umount2(c"/sys/kernel/tracing".as_ptr(), libc::MNT_DETACH) };
    }
    let (e, _) = r?;
    ensure_eq!(e.exit_code, Some(code), "exit_code");
    Ok(format!("exit_code={code} via {kind}"))
}

pub fn plain_tracepoint_fallback(_: &Context) -> Verdict {
    forced(AttachType::Tracepoint, 5)
}

pub fn tp_btf_fallback(_: &Context) -> Verdict {
    forced(AttachType::TpBtf, 6)
}

/// 10,000 short processes: every exit seen. The ring (4 MiB) holds the
/// whole storm even if it were never drained (an event is well under 400
/// bytes), so a missing exit is a failure, not a loss to excuse: the loss
/// counter is the probe's, node-wide, and cannot tell the storm's own
/// losses from other processes', so it is reported, not relied on.
pub fn ten_thousand_processes(_: &Context) -> Verdict {
    const N: u32 = 10_000;
    const RING_BYTES: u32 = 1 << 22;
    const _: () = assert!(
        (N as usize) * 400 < RING_BYTES as usize,
        "the ring must hold the whole storm"
    );
    let mut t = Tracer::attach(None, RING_BYTES)?;
    let lost_before = t.probe.stats().lost;
    let start = Instant::now();
    // A storm parent starts N children that exit at once; we count the events
    // whose parent is the storm parent. vfork keeps each start cheap (no page
    // tables copied from this process).
    // SAFETY: the children only call vfork/waitpid/_exit.
    let storm = unsafe { libc::fork() };
    if storm < 0 {
        fail!("fork: {}", std::io::Error::last_os_error());
    }
    if storm == 0 {
        unsafe {
            for _ in 0..N {
                // The vfork child calls nothing but _exit, the one use vfork is sound for.
                #[allow(deprecated)]
                let c = libc::vfork();
                if c == 0 {
                    libc::_exit(0);
                }
                if c > 0 {
                    libc::waitpid(c, std::ptr::null_mut(), 0);
                }
            }
            libc::_exit(0);
        }
    }
    let (mut seen, mut wrong_code, mut storm_done) = (0u32, 0u32, false);
    let mut count = |e: Exit, storm_done: &mut bool| {
        if e.ppid == storm as u32 && !e.thread {
            seen += 1;
            wrong_code += u32::from(e.exit_code != Some(0));
        }
        if e.tgid == storm as u32 && !e.thread {
            *storm_done = true;
        }
    };
    // Generous: under software emulation a fork+exit costs ~1 ms.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && !storm_done {
        t.probe.drain(|e| count(e, &mut storm_done));
        std::thread::sleep(Duration::from_millis(2));
    }
    if !storm_done {
        // SAFETY: storm is our child.
        unsafe { libc::kill(storm, libc::SIGKILL) };
    }
    // SAFETY: storm is our child.
    unsafe { libc::waitpid(storm, std::ptr::null_mut(), 0) };
    t.probe.drain(|e| count(e, &mut storm_done));
    let lost = t.probe.stats().lost - lost_before;
    ensure!(storm_done, "the storm did not finish within 120 s");
    ensure_eq!(wrong_code, 0, "children with an exit code other than 0");
    ensure!(
        seen == N,
        "{seen} of {N} exits seen ({lost} events lost by the probe, node-wide)"
    );
    Ok(format!(
        "{seen} of {N} seen, {lost} lost, {:.1} s",
        start.elapsed().as_secs_f64()
    ))
}
