//! Termination forensics' kernel side on every kernel: the signal probe
//! names sender and target and tells a fault from a kill; the OOM probe
//! names the victim and reads the memory cgroup's counters at the OOM; the
//! cgroup probe reports a new cgroup's first exec (a container's entrypoint).

use std::{
    ffi::CString,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::Ebpf;

use super::{Context, Stop, Verdict, ensure, ensure_eq, fail};
use crate::{
    forensics::scope,
    kernel::cgroups::CgroupLayout,
    probes::{
        self, KernelOffsets, LoadOptions,
        cgroups::{CgroupOp, CgroupProbe},
        oom::{OomKill, OomProbe, OomScope},
        signals::{Delivery, Handler, Origin, Signal, SignalProbe},
    },
};

const WAIT: Duration = Duration::from_secs(10);

fn load() -> Result<(Ebpf, KernelOffsets, probes::AttachBtf), Stop> {
    let offsets = KernelOffsets::from_sys_fs()?;
    let ebpf = probes::load_object(&offsets, &LoadOptions::default())?;
    Ok((ebpf, offsets, probes::attach_btf()))
}

/// Drains `drain` until `pred` matches an item or the wait ends.
fn wait_for<T>(mut drain: impl FnMut(&mut dyn FnMut(T)), pred: impl Fn(&T) -> bool) -> Option<T> {
    let deadline = Instant::now() + WAIT;
    let mut found = None;
    while found.is_none() && Instant::now() < deadline {
        drain(&mut |x| {
            if found.is_none() && pred(&x) {
                found = Some(x);
            }
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    found
}

/// `child` must end with `_exit`; returning from it ends the child with 99.
fn fork_child(child: impl FnOnce()) -> Result<i32, Stop> {
    // SAFETY: the child only makes system calls before it ends.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        child();
        // SAFETY: never unwind or run the parent's destructors in the child.
        unsafe { libc::_exit(99) };
    }
    Ok(pid)
}

fn reap(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: pid is our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    status
}

pub fn signal_sender_and_target(_: &Context) -> Verdict {
    let (mut ebpf, _, btf) = load()?;
    let mut probe = SignalProbe::attach(&mut ebpf, &btf)?;
    let pid = fork_child(|| unsafe {
        libc::pause();
        libc::_exit(0)
    })?;
    // The child sleeps in pause() (state S) before it is signalled.
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|r| r.starts_with('S')))
    {
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid);
            fail!("child {pid} did not reach pause() within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    reap(pid);
    let me = std::process::id();
    let Some(s) = wait_for(
        |f| {
            probe.drain(&mut *f);
        },
        |s: &Signal| s.target.tgid == pid as u32 && s.signo == 15,
    ) else {
        fail!("no SIGTERM event for pid {pid}")
    };
    ensure_eq!(s.sender.tgid, me, "sender");
    ensure_eq!(s.origin, Origin::Kill, "origin");
    ensure_eq!(s.delivery, Delivery::Delivered, "delivery");
    ensure_eq!(s.handler, Handler::Default, "the target's disposition");
    ensure!(
        s.target.cgroup_id != 0 || CgroupLayout::current().v2_root().is_none(),
        "target cgroup id read"
    );
    // SIGCHLD (our child's end) cannot end a process: filtered in the kernel.
    let chld = wait_for(
        |f| {
            probe.drain(&mut *f);
        },
        |s: &Signal| s.signo == 17,
    );
    ensure!(chld.is_none(), "SIGCHLD was not filtered: {chld:?}");
    Ok(format!(
        "SIGTERM {me} -> {pid} via {}",
        probe.attachment.attach_type
    ))
}

pub fn signal_fault_origin(_: &Context) -> Verdict {
    let (mut ebpf, _, btf) = load()?;
    let mut probe = SignalProbe::attach(&mut ebpf, &btf)?;
    let pid = fork_child(|| unsafe {
        // Cores of this test go nowhere.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        std::ptr::write_volatile(std::ptr::null_mut::<u8>(), 1);
        libc::_exit(0)
    })?;
    reap(pid);
    let Some(s) = wait_for(
        |f| {
            probe.drain(&mut *f);
        },
        |s: &Signal| s.target.tgid == pid as u32 && s.signo == 11,
    ) else {
        fail!("no SIGSEGV event for pid {pid}")
    };
    ensure_eq!(s.origin, Origin::Fault, "origin of a real fault");
    ensure_eq!(
        s.sender.tgid,
        pid as u32,
        "a fault is raised in the faulting process"
    );
    ensure!(
        s.si_code > 0,
        "si_code of a fault is positive: {}",
        s.si_code
    );
    Ok(format!("SIGSEGV code {} in {pid}", s.si_code))
}

/// A memory cgroup of its own with `limit` bytes: (directory, path relative
/// to the hierarchy's root as events name it).
fn memory_cgroup(limit: u64) -> Result<(PathBuf, String), Stop> {
    let name = format!("podscope-selftest-oom-{}", std::process::id());
    let layout = CgroupLayout::current();
    let (root, file, value) = match (&layout, layout.v1_controller("memory")) {
        (_, Some(v1)) => (v1.clone(), "memory.limit_in_bytes", limit.to_string()),
        (CgroupLayout::V2 { root }, None) => {
            // The guests mount a bare cgroup2: delegate the controller first.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
            (root.clone(), "memory.max", limit.to_string())
        }
        _ => return Err(Stop::Skip("no memory cgroup controller is mounted".into())),
    };
    let dir = root.join(&name);
    std::fs::create_dir_all(&dir)?;
    if let Err(e) = std::fs::write(dir.join(file), value) {
        let _ = std::fs::remove_dir(&dir);
        return Err(Stop::Skip(format!(
            "cannot set a memory limit ({e}): no memory controller here"
        )));
    }
    Ok((dir, format!("/{name}")))
}

pub fn oom_victim_and_scope(_: &Context) -> Verdict {
    let limit = 16u64 << 20;
    let (dir, rel) = memory_cgroup(limit)?;
    let result = oom_in(&dir, &rel, limit);
    // The cgroup is empty once the victim is reaped.
    let _ = std::fs::remove_dir(&dir);
    result
}

fn oom_in(dir: &std::path::Path, rel: &str, limit: u64) -> Verdict {
    let (mut ebpf, offsets, btf) = load()?;
    let mut oom = OomProbe::attach(&mut ebpf, &offsets.oom)?;
    let mut signals = SignalProbe::attach(&mut ebpf, &btf)?;
    let procs = CString::new(dir.join("cgroup.procs").to_string_lossy().into_owned())
        .map_err(|e| Stop::Fail(e.to_string()))?;
    let pid = fork_child(move || unsafe {
        // Move ourselves in ("0" is the writer), then touch 64 MiB.
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
        if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            libc::_exit(90);
        }
        libc::close(fd);
        let len = 64usize << 20;
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            libc::_exit(91);
        }
        let mut off = 0;
        while off < len {
            std::ptr::write_volatile((p as *mut u8).add(off), 1);
            off += 4096;
        }
        libc::_exit(0)
    })?;
    let status = reap(pid);
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 90 {
        fail!("the child could not join {}", dir.display());
    }
    ensure!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "the child was not OOM-killed (status {status:#x})"
    );
    let Some(o) = wait_for(
        |f| {
            oom.drain(&mut *f);
        },
        |o: &OomKill| o.victim_pid == pid as u32,
    ) else {
        fail!("no mark_victim event for pid {pid}")
    };
    ensure!(
        !o.memcg.is_empty(),
        "the memory cgroup's counters were read"
    );
    let reading = scope::from_levels(&o.memcg, Some(rel));
    let Some(r) = reading else {
        fail!("no scope from {:?}", o.memcg)
    };
    ensure_eq!(
        r.scope,
        OomScope::Container,
        "scope (the limit of the victim's own cgroup)"
    );
    ensure_eq!(r.limit_bytes, Some(limit), "limit read at the OOM");
    let kill = wait_for(
        |f| {
            signals.drain(&mut *f);
        },
        |s: &Signal| s.target.tgid == pid as u32 && s.signo == 9,
    );
    let Some(kill) = kill else {
        fail!("no SIGKILL event for the victim")
    };
    ensure_eq!(
        kill.origin,
        Origin::Kernel,
        "the OOM killer's SIGKILL comes from the kernel"
    );
    Ok(format!(
        "victim {pid} ({}) usage {} of {}; figures {}",
        o.victim_comm,
        r.usage_bytes.unwrap_or(0),
        limit,
        if o.memory.is_some() {
            "present"
        } else {
            "absent (kernel < 6.8)"
        }
    ))
}

pub fn cgroup_first_exec(_: &Context) -> Verdict {
    let Some(root) = CgroupLayout::current().v2_root().cloned() else {
        return Err(Stop::Skip("no cgroup v2 hierarchy is mounted".into()));
    };
    let (mut ebpf, offsets, btf) = load()?;
    let mut probe = CgroupProbe::attach(&mut ebpf, &btf, &offsets.cgroups, None)?;
    let dir = root.join(format!("podscope-selftest-exec-{}", std::process::id()));
    std::fs::create_dir(&dir)?;
    let id = std::fs::metadata(&dir)?.ino();
    let procs = CString::new(dir.join("cgroup.procs").to_string_lossy().into_owned())
        .map_err(|e| Stop::Fail(e.to_string()))?;
    let sh = CString::new("/bin/sh").map_err(|e| Stop::Fail(e.to_string()))?;
    let args = [
        sh.as_ptr(),
        c"-c".as_ptr(),
        c"exit 0".as_ptr(),
        std::ptr::null(),
    ];
    // A bootstrap process enters first and forks the one that execs, as
    // runc does: the exec's process is the one reported.
    let pid = fork_child(move || unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
        if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            libc::_exit(90);
        }
        libc::close(fd);
        let inner = libc::fork();
        if inner == 0 {
            libc::execv(sh.as_ptr(), args.as_ptr());
            libc::_exit(91);
        }
        let mut st = 0;
        libc::waitpid(inner, &mut st, 0);
        libc::_exit(if inner > 0 { 0 } else { 92 })
    })?;
    let status = reap(pid);
    let ev = wait_for(
        |f| {
            probe.drain(&mut *f);
        },
        |c: &crate::probes::cgroups::CgroupChange| {
            c.id == id && matches!(c.op, CgroupOp::FirstExec { .. })
        },
    );
    let _ = std::fs::remove_dir(&dir);
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child ran (status {status:#x})"
    );
    let Some(ev) = ev else {
        fail!("no first-exec event for cgroup {id}")
    };
    let CgroupOp::FirstExec { tgid } = ev.op else {
        fail!("{ev:?}")
    };
    ensure!(
        tgid != pid as u32,
        "the bootstrap process (which never exec'd) is not reported"
    );
    Ok(format!(
        "first exec in cgroup {id} by pid {tgid} (bootstrap {pid})"
    ))
}
