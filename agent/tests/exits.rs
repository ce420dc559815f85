//! Exit tracing on the real kernel: real processes, real signals, and the
//! parent's own wait status as the ground truth. Needs root.

mod support;

use std::{
    os::unix::process::ExitStatusExt,
    process::{Command, Stdio},
    time::Duration,
};

use podscope::probes::AttachType;
use support::{Tracer, privileged};

const WAIT: Duration = Duration::from_secs(10);

/// Spawns `cmd`, lets `act` do something to it, reaps it, and returns the
/// process's exit event with the wait status the parent saw.
fn exit_of(
    tracer: &mut Tracer,
    cmd: &mut Command,
    act: impl FnOnce(u32),
) -> (podscope::probes::exits::Exit, std::process::ExitStatus) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    act(pid);
    let status = child.wait().unwrap();
    let exit = tracer
        .wait_for(WAIT, |e| e.tgid == pid && !e.thread)
        .unwrap_or_else(|| panic!("no exit event for pid {pid}"));
    (exit, status)
}

fn signal(pid: u32, sig: i32) {
    // Let the child reach its main loop first.
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: pid is our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// cgroup v2 id of this process: the inode of its v2 cgroup directory.
fn own_cgroup_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let layout = podscope::kernel::cgroups::CgroupLayout::current();
    let root = layout.v2_root()?.clone();
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    std::fs::metadata(root.join(rel.trim_start_matches('/')))
        .ok()
        .map(|m| m.ino())
}

#[test]
fn exit_code_3_is_reported() {
    if !privileged("exit_code_3_is_reported") {
        return;
    }
    let mut t = Tracer::attach(None, 1 << 20);
    let (e, status) = exit_of(&mut t, Command::new("sh").args(["-c", "exit 3"]), |_| {});
    assert_eq!(status.code(), Some(3));
    assert_eq!(e.exit_code, Some(3));
    assert_eq!(e.signal, None);
    assert!(!e.core_dumped && !e.thread && !e.partial);
    assert_eq!(e.comm, "sh");
    assert_eq!(e.ppid, std::process::id());
    assert_eq!(e.pid, e.tgid);
    assert!(
        e.lifetime_ns > 0 && e.lifetime() < Duration::from_secs(10),
        "{:?}",
        e.lifetime()
    );
    if let Some(id) = own_cgroup_id() {
        assert_eq!(e.cgroup_id, id, "the child lives in our cgroup");
    }
}

#[test]
fn sigkill_is_reported() {
    if !privileged("sigkill_is_reported") {
        return;
    }
    let mut t = Tracer::attach(None, 1 << 20);
    let (e, status) = exit_of(&mut t, Command::new("sleep").arg("30"), |pid| {
        signal(pid, libc::SIGKILL)
    });
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert_eq!(e.signal.as_deref(), Some("SIGKILL"));
    assert_eq!(e.exit_code, None);
    assert_eq!(e.comm, "sleep");
}

#[test]
fn default_sigterm_is_reported() {
    if !privileged("default_sigterm_is_reported") {
        return;
    }
    let mut t = Tracer::attach(None, 1 << 20);
    let (e, status) = exit_of(&mut t, Command::new("sleep").arg("30"), |pid| {
        signal(pid, libc::SIGTERM)
    });
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert_eq!(e.signal.as_deref(), Some("SIGTERM"));
    assert_eq!(e.exit_code, None);
}

#[test]
fn a_segfault_is_reported_with_the_core_flag_the_kernel_decided() {
    if !privileged("a_segfault_is_reported_with_the_core_flag_the_kernel_decided") {
        return;
    }
    let mut t = Tracer::attach(None, 1 << 20);
    // A real invalid memory access, in a child forked for it. Core files (if
    // the system's core settings write any) land in a scratch directory.
    let scratch = std::env::temp_dir().join(format!("podscope-core-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let scratch_c = std::ffi::CString::new(scratch.to_str().unwrap()).unwrap();
    // SAFETY: the child only calls async-signal-safe functions before it faults.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
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
    let e = t
        .wait_for(WAIT, |e| e.tgid == pid as u32 && !e.thread)
        .expect("no exit event for the crash");
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(libc::WIFSIGNALED(status));
    assert_eq!(libc::WTERMSIG(status), libc::SIGSEGV);
    assert_eq!(e.signal.as_deref(), Some("SIGSEGV"));
    assert_eq!(
        e.core_dumped,
        libc::WCOREDUMP(status),
        "core flag must match what the parent saw"
    );
}

#[test]
fn a_thread_ending_in_a_live_process_is_a_thread_exit() {
    if !privileged("a_thread_ending_in_a_live_process_is_a_thread_exit") {
        return;
    }
    let mut t = Tracer::attach(None, 1 << 20);
    let tid = std::thread::Builder::new()
        .name("podscope-short".into())
        .spawn(|| unsafe { libc::gettid() } as u32)
        .unwrap()
        .join()
        .unwrap();
    let me = std::process::id();
    let e = t
        .wait_for(WAIT, |e| e.pid == tid)
        .expect("no exit event for the thread");
    assert!(e.thread, "{e:?}");
    assert_eq!(e.tgid, me);
    assert_eq!(e.comm, "podscope-short");
    assert_eq!(e.exit_code, Some(0));
    // And the process itself is alive: no process-exit event for it.
    assert!(
        t.wait_for(Duration::from_millis(200), |e| e.tgid == me && !e.thread)
            .is_none()
    );
}

#[test]
fn a_multithreaded_process_exiting_gives_one_process_event() {
    if !privileged("a_multithreaded_process_exiting_gives_one_process_event") {
        return;
    }
    let mut t = Tracer::attach(None, 1 << 20);
    // Four threads sleeping when the process exits with 7: the other threads
    // are folded into the process's single event.
    let script = "import threading, time, os\n\
                  [threading.Thread(target=time.sleep, args=(30,), daemon=True).start() for _ in range(4)]\n\
                  time.sleep(0.05)\nos._exit(7)\n";
    let (e, status) = exit_of(&mut t, Command::new("python3").args(["-c", script]), |_| {});
    assert_eq!(status.code(), Some(7));
    assert_eq!(e.exit_code, Some(7));
    assert!(!e.thread);
    let pid = e.tgid;
    let mut extra = 0;
    std::thread::sleep(Duration::from_millis(100));
    t.probe.drain(|x| extra += (x.tgid == pid) as u32);
    assert_eq!(
        extra, 0,
        "threads torn down with their process produce no events of their own"
    );
}

#[test]
fn the_plain_tracepoint_fallback_works_too() {
    if !privileged("the_plain_tracepoint_fallback_works_too") {
        return;
    }
    let was_mounted = podscope::kernel::tracefs::mounted().is_some();
    let mut t = Tracer::attach(Some(AttachType::Tracepoint), 1 << 20);
    assert_eq!(t.probe.attachment.attach_type, AttachType::Tracepoint);
    let (e, _) = exit_of(&mut t, Command::new("sh").args(["-c", "exit 5"]), |_| {});
    assert_eq!(e.exit_code, Some(5));
    drop(t);
    if !was_mounted {
        // We mounted tracefs for this test: leave the machine as we found it.
        unsafe { libc::umount2(c"/sys/kernel/tracing".as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn ten_thousand_short_processes_are_all_accounted_for() {
    if !privileged("ten_thousand_short_processes_are_all_accounted_for") {
        return;
    }
    const N: u32 = 10_000;
    let mut t = Tracer::attach(None, 1 << 22);
    let lost_before = t.probe.stats().lost;
    // A storm parent starts N children that exit at once; we count the
    // events whose parent is the storm parent. vfork keeps each start cheap
    // (no page tables copied from this large test process).
    // SAFETY: the children only call fork/vfork/waitpid/_exit.
    let storm = unsafe { libc::fork() };
    assert!(storm >= 0);
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
    let mut seen = 0u32;
    let mut storm_done = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        t.probe.drain(|e| {
            if e.ppid == storm as u32 && !e.thread {
                assert_eq!(e.exit_code, Some(0));
                seen += 1;
            }
            if e.tgid == storm as u32 && !e.thread {
                storm_done = true;
            }
        });
        if storm_done {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    unsafe { libc::waitpid(storm, std::ptr::null_mut(), 0) };
    t.probe
        .drain(|e| seen += (e.ppid == storm as u32 && !e.thread) as u32);
    let lost = t.probe.stats().lost - lost_before;
    assert!(storm_done, "the storm did not finish");
    assert!(seen <= N);
    assert!(
        seen == N || u64::from(seen) + lost >= u64::from(N),
        "{seen} of {N} exits seen and only {lost} counted as lost"
    );
    eprintln!("{seen} of {N} exits seen, {lost} lost");
}
