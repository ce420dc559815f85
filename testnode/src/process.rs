//! Daemons and signals, always by recorded PID: the node never looks a
//! process up by name, so it cannot hit someone else's containerd.

use std::{
    fs::File,
    os::unix::{io::AsRawFd, process::CommandExt},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::error::{Error, IoContext, Result};

pub fn read_pid(pid_file: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// The process's command line, NUL-separated arguments joined by spaces.
pub fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Alive and not a zombie.
pub fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised comm, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// The PID recorded in `pid_file`, if that process still runs and its
/// command line contains `marker` (a recycled PID would not).
pub fn recorded(pid_file: &Path, marker: &str) -> Option<i32> {
    let pid = read_pid(pid_file)?;
    (is_running(pid) && cmdline(pid).is_some_and(|c| c.contains(marker))).then_some(pid)
}

/// Starts `cmd` detached (own session, stdin closed, output to `log`),
/// optionally inside the network namespace `netns` (a /run/netns file),
/// and records its PID in `pid_file`.
pub fn spawn_daemon(
    mut cmd: Command,
    log: &Path,
    pid_file: &Path,
    netns: Option<&Path>,
) -> Result<i32> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .ctx(|| format!("cannot open {}", log.display()))?;
    let err = out
        .try_clone()
        .ctx(|| format!("cannot open {}", log.display()))?;
    let ns = netns
        .map(|p| File::open(p).ctx(|| format!("cannot open network namespace {}", p.display())))
        .transpose()?;
    let ns_fd = ns.as_ref().map(|f| f.as_raw_fd());
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // setns(2) rather than `ip netns exec`: that would also give the daemon
    // a private mount namespace, hiding containerd's mounts (rootfs, pod
    // network namespaces) from the host, unlike on a real node.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = ns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // A daemon outlives whoever started it: it must not keep their
            // descriptors open (a caller's `flock` on a lock file would stay
            // held for as long as the node runs). CLOSE_RANGE_CLOEXEC rather
            // than closing: std's own exec-error pipe is among them.
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .ctx(|| format!("cannot start {:?}", cmd.get_program()))?;
    let pid = child.id() as i32;
    std::fs::write(pid_file, format!("{pid}\n"))
        .ctx(|| format!("cannot write {}", pid_file.display()))?;
    Ok(pid)
}

/// SIGTERM, then SIGKILL after `grace`; returns once the process is gone.
pub fn terminate(pid: i32, grace: Duration) -> Result<()> {
    if !is_running(pid) {
        return Ok(());
    }
    signal(pid, libc::SIGTERM);
    if wait_gone(pid, grace) {
        return Ok(());
    }
    signal(pid, libc::SIGKILL);
    if wait_gone(pid, Duration::from_secs(5)) {
        Ok(())
    } else {
        Err(Error::Msg(format!(
            "process {pid} survived SIGKILL for 5 s"
        )))
    }
}

pub fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        unsafe { libc::kill(pid, sig) };
    }
}

/// Waits until `pid` is gone (or a zombie, which reaps itself once its
/// parent exits); reaps it if it is our own child.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        if !is_running(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A fresh random UUID from the kernel (a pod uid when the manifest has none).
pub fn random_uuid() -> Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .ctx(|| "cannot read /proc/sys/kernel/random/uuid".into())
}

/// Serialises `up`, `down` and `containerd start|stop` between processes (two
/// test binaries bringing the node up at once would otherwise both start a
/// containerd). An advisory `flock(2)` on a file beside the state directory,
/// released when the guard drops; `down` removes the file.
pub struct NodeLock {
    _file: File,
}

impl NodeLock {
    pub fn acquire() -> Result<NodeLock> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(crate::paths::LOCK_FILE)
            .ctx(|| format!("cannot open {}", crate::paths::LOCK_FILE))?;
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::Io {
                what: format!("cannot lock {}", crate::paths::LOCK_FILE),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(NodeLock { _file: file })
    }
}
