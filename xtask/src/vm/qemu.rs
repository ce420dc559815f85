//! Boots a kernel under qemu (TCG: software emulation, because KVM cannot
//! run stock kernels on this machine) with the test initramfs, and collects
//! the serial console. The guest has no network device at all, and a hung
//! guest is killed (by the PID we spawned) after a deadline.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use super::{kernels::Kernel, report::Run};
use crate::arch::Arch;

/// Far above a normal run (about 10–15 s under TCG), far below CI's budget.
const DEADLINE: Duration = Duration::from_secs(300);

/// The kernel command line; everything after `--` is /init's arguments.
fn append(arch: Arch, args: &[String]) -> String {
    // loglevel=1 keeps kernel messages (segfault reports, for one) from
    // splicing into the result lines on the shared console.
    let mut s = format!("console={} panic=-1 loglevel=1 --", arch.console());
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

pub fn boot(arch: Arch, kernel: &Kernel, initrd: &Path, args: &[String], log: &Path) -> Run {
    let started = Instant::now();
    let (qemu, package) = arch.qemu();
    let mut cmd = Command::new(qemu);
    // Two vCPUs, so per-CPU maps and cross-CPU ring-buffer order are
    // exercised, emulated round-robin on one host thread: measured on the
    // 10,000-process scenario, multi-threaded TCG took 33 s (its vCPUs
    // spend the time synchronising), one thread 4 s, a single vCPU 2 s.
    cmd.args(["-accel", "tcg,thread=single", "-smp", "2", "-m", "1024"])
        .args(arch.machine())
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append(arch, args))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Run::broken(format!(
                "cannot start {qemu} ({e}): install {package} (`cargo xtask setup` does)"
            ));
        }
    };
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = vec![];
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(format!("qemu: {line}")).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);

    let mut console = String::new();
    let mut booted = None;
    // When each result line arrived: a scenario's time is the gap to the previous one.
    let mut result_times = vec![];
    let mut timed_out = false;
    loop {
        let left = DEADLINE.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                if booted.is_none() && line.contains("PODSCOPE-BOOTED") {
                    booted = Some(started.elapsed());
                }
                if line.contains(super::report::TEST_PREFIX) {
                    result_times.push(started.elapsed());
                }
                console.push_str(line);
                console.push('\n');
            }
            // Both pipes closed: qemu has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                // Our own child, by its PID.
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait();
    for r in readers {
        let _ = r.join();
    }
    let _ = std::fs::write(log, &console);
    let mut run = Run::parse(&console);
    run.boot = booted;
    let mut prev = booted;
    for (r, at) in run.results.iter_mut().zip(result_times) {
        r.seconds = prev.map(|p| at.saturating_sub(p).as_secs_f64());
        prev = Some(at);
    }
    run.kernel.get_or_insert_with(|| kernel.package.clone());
    if timed_out {
        run.problem = Some(format!(
            "the guest did not finish within {} s and was killed (console in {})",
            DEADLINE.as_secs(),
            log.display()
        ));
    } else if let (Some(p), Ok(st)) = (run.problem.as_mut(), status) {
        p.push_str(&format!(" (qemu {st}; console in {})", log.display()));
    }
    run
}
