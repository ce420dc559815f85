//! Builds that run beside the test command's foreground work.
//!
//! On 2 cores the test command is mostly builds, and its longest phase, the
//! test run, mostly waits (for pods, containerd, timeouts): the builds that
//! only later phases need (the fuzz targets, the kernel matrix's static
//! binaries) run beside clippy, `cargo test`'s build and the test run,
//! each in its own target directory (cargo locks one per build), at the
//! lowest CPU priority so that the foreground, and the tests' agents and
//! pods, always come first. When the foreground needs one, it is raised
//! back to normal priority and waited for. Its output goes to a log file,
//! shown when it fails.
//!
//! The lowest priority is two things: niceness 19, which orders the tasks
//! of one scheduling group only, and, as root, a cpu cgroup of its own
//! marked idle (`cpu.idle`, Linux 5.15). Without the cgroup the build
//! would sit in the test command's group (its session's autogroup, or
//! its cgroup), which competes as one with the pods' cgroups and
//! containerd's: any runnable build task would have the whole group
//! claim its share, taking up to half the CPU from the pods.

use std::{
    ffi::CString,
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The niceness of a build in the background: the lowest priority.
const BACKGROUND: libc::c_int = 19;

/// A build running in the background, in its own process group (ended
/// with it if the test command stops early).
pub struct Build {
    what: &'static str,
    /// The process group: the build's cargo and everything it runs.
    pgid: libc::pid_t,
    log: PathBuf,
    started: Instant,
    /// The build's exit status and when it ended.
    done: Option<JoinHandle<(std::io::Result<ExitStatus>, Instant)>>,
    /// Its idle cpu cgroup, when one could be made (removed after it).
    group: Option<IdleGroup>,
}

/// A finished build: how long it ran, and how long the foreground waited for it.
#[derive(Debug)]
pub struct Built {
    pub took: Duration,
    pub waited: Duration,
}

impl Build {
    /// Starts `cmd` in the background, its output going to `log`.
    pub fn start(what: &'static str, log: PathBuf, mut cmd: Command) -> Result<Build> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let name = log.file_stem().map(|s| s.to_string_lossy().into_owned());
        let group = IdleGroup::create(&format!(
            "podscope-xtask-{}-{}",
            std::process::id(),
            name.unwrap_or_default()
        ));
        let procs = group.as_ref().and_then(|g| g.procs());
        // SAFETY: only async-signal-safe calls (setpriority, open, write,
        // close) on what was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // Best effort: a build at normal priority is only slower.
                libc::setpriority(libc::PRIO_PROCESS, 0, BACKGROUND);
                if let Some(procs) = &procs {
                    // "0": the writing process itself; its children follow.
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start the {what}' build"))?;
        let pgid = child.id() as libc::pid_t;
        let done = std::thread::spawn(move || (child.wait(), Instant::now()));
        Ok(Build {
            what,
            pgid,
            log,
            started: Instant::now(),
            done: Some(done),
            group,
        })
    }

    /// Waits for the build at normal priority (as root; otherwise it stays
    /// low): Err with the end of its log when it failed.
    pub fn wait(mut self) -> Result<Built> {
        let asked = Instant::now();
        if let Some(g) = &self.group {
            g.raise();
        }
        // SAFETY: a plain system call on this build's own process group.
        unsafe { libc::setpriority(libc::PRIO_PGRP, self.pgid as libc::id_t, 0) };
        let done = self
            .done
            .take()
            .context("the build was already waited for")?;
        let (status, ended) = done
            .join()
            .map_err(|_| anyhow::anyhow!("the thread waiting for the {} panicked", self.what))?;
        let status = status.with_context(|| format!("cannot wait for the {}' build", self.what))?;
        let built = Built {
            took: ended.duration_since(self.started),
            waited: ended.saturating_duration_since(asked),
        };
        if !status.success() {
            bail!(
                "building the {} failed ({status}); the end of {}:\n{}",
                self.what,
                self.log.display(),
                tail(&self.log, 40)
            );
        }
        Ok(built)
    }
}

impl Build {
    /// Ends the build, with everything it started, if it still runs;
    /// returns its exit status (None when it was already waited for).
    fn stop(&mut self) -> Option<std::io::Result<ExitStatus>> {
        let done = self.done.take()?;
        if !done.is_finished() {
            // SAFETY: a signal to this build's own process group.
            unsafe { libc::kill(-self.pgid, libc::SIGTERM) };
        }
        done.join().ok().map(|(status, _)| status)
    }
}

/// A build nobody waited for (the test command stopped early: clippy
/// failed, an error) is ended.
impl Drop for Build {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a background build's output goes: `target/xtask/<name>.log`.
pub fn log_path(name: &str) -> PathBuf {
    crate::root()
        .join("target/xtask")
        .join(format!("{name}.log"))
}

/// A cpu cgroup whose tasks run only on CPU time nothing else wants.
struct IdleGroup {
    dir: PathBuf,
}

impl IdleGroup {
    /// Made beside the test command's own cpu cgroup (v1's cpu controller)
    /// or at the root of the unified hierarchy (v2, where a cgroup with
    /// processes cannot have controlled children); None without root or
    /// without `cpu.idle`.
    fn create(name: &str) -> Option<IdleGroup> {
        let dir = cpu_cgroup_parent()?.join(name);
        std::fs::create_dir(&dir).ok()?;
        let group = IdleGroup { dir };
        // Dropped (removed) when the kernel has no `cpu.idle`.
        std::fs::write(group.dir.join("cpu.idle"), "1").ok()?;
        Some(group)
    }

    fn procs(&self) -> Option<CString> {
        CString::new(self.dir.join("cgroup.procs").as_os_str().as_bytes()).ok()
    }

    /// Normal priority (weight) again.
    fn raise(&self) {
        let _ = std::fs::write(self.dir.join("cpu.idle"), "0");
    }
}

/// Removed once its build has ended (empty: cargo waits for what it runs).
impl Drop for IdleGroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Where an idle cgroup for a build can go.
fn cpu_cgroup_parent() -> Option<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        if controllers.split(',').any(|c| c == "cpu") {
            let path = path.trim_start_matches('/');
            return ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
                .iter()
                .map(|m| Path::new(m).join(path))
                .find(|d| d.join("cpu.shares").exists());
        }
    }
    let root = Path::new("/sys/fs/cgroup");
    std::fs::read_to_string(root.join("cgroup.subtree_control"))
        .ok()?
        .split_whitespace()
        .any(|c| c == "cpu")
        .then(|| root.to_path_buf())
}

/// The last `lines` lines of a log file.
fn tail(path: &std::path::Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)));
        let mut bytes = vec![];
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    /// A log file of this test process's own, removed by the caller.
    fn scratch_log(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("podscope-xtask-{}-{name}.log", std::process::id()))
    }

    #[test]
    fn a_failed_build_shows_the_end_of_its_log() {
        let (ok_log, bad_log) = (scratch_log("ok"), scratch_log("bad"));
        let built = Build::start("test things", ok_log.clone(), Command::new("true"))
            .unwrap()
            .wait();
        let mut bad = Command::new("sh");
        bad.args(["-c", "echo first; echo 'error: it broke' >&2; exit 3"]);
        let failed = Build::start("test things", bad_log.clone(), bad)
            .unwrap()
            .wait();
        let _ = std::fs::remove_file(ok_log);
        let _ = std::fs::remove_file(bad_log);
        let built = built.unwrap();
        assert!(built.waited <= built.took);
        let err = failed.unwrap_err().to_string();
        assert!(err.starts_with("building the test things failed"), "{err}");
        assert!(err.ends_with("first\nerror: it broke"), "{err}");
    }

    #[test]
    fn a_build_runs_at_low_priority_and_ends_if_nobody_waits_for_it() {
        let log = scratch_log("stopped");
        let mut slow = Command::new("sh");
        slow.args(["-c", "exec sleep 60"]);
        let mut build = Build::start("test things", log.clone(), slow).unwrap();
        // Field 19 of /proc/PID/stat is the niceness (after the command's
        // name in parentheses, which has no space here).
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", build.pgid)).unwrap();
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", build.pgid)).unwrap();
        let group = build.group.as_ref().map(|g| g.dir.clone());
        let status = build.stop();
        drop(build);
        let _ = std::fs::remove_file(log);
        assert_eq!(stat.split(' ').nth(18), Some("19"), "{stat}");
        // As root, with cpu.idle: in an idle cgroup of its own, removed after it.
        if let Some(dir) = group {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            assert!(cgroups.contains(&name), "not in {name}: {cgroups}");
            assert!(!dir.exists(), "{} is left", dir.display());
        }
        let status = status.unwrap().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
    }
}
