//! One drain pass on the real kernel: bounded per ring, and ordered across
//! the families forensics joins (a process's SIGKILL is read before its
//! exit even when the signals ring holds more than a pass takes). Needs root.

mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use podscope::probes::{
    self, KernelOffsets, LoadOptions, Pass, exits::ExitProbe, signals::SignalProbe,
};
use support::privileged;

const SIGNALS: usize = 20;
const BUDGET: usize = 4;

#[test]
fn a_pass_is_bounded_and_reads_a_sigkill_before_its_exit() {
    if !privileged("a_pass_is_bounded_and_reads_a_sigkill_before_its_exit") {
        return;
    }
    let offsets = KernelOffsets::from_sys_fs().unwrap();
    let mut ebpf = probes::load_object(&offsets, &LoadOptions::default()).unwrap();
    let btf = probes::attach_btf();
    let mut signals = SignalProbe::attach(&mut ebpf, &btf).unwrap();
    let mut exits = ExitProbe::attach(&mut ebpf, &btf, None).unwrap();

    // A process that ignores SIGUSR1 (its default action ends a process, so
    // the probe reports each), signalled many times, then killed.
    let mut child = Command::new("sh")
        .args(["-c", "trap '' USR1; exec sleep 30"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..SIGNALS {
        // SAFETY: the test's own child.
        unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    }
    let _ = child.kill();
    let _ = child.wait();

    // Passes of BUDGET records a ring, as the drain thread makes them: at
    // once while a ring has more, after a pause when it had not.
    let mut usr1 = 0;
    let mut kill_pass = None;
    let mut exit_pass = None;
    let mut passes_with_more = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut i = 0;
    while (exit_pass.is_none() || kill_pass.is_none() || usr1 < SIGNALS)
        && Instant::now() < deadline
    {
        let mut pass = Pass::new(BUDGET);
        let mut taken = (0, 0);
        signals.drain_within(&mut pass, |s| {
            taken.0 += 1;
            if s.target.tgid == pid {
                match s.signo as i32 {
                    libc::SIGUSR1 => usr1 += 1,
                    libc::SIGKILL => kill_pass = kill_pass.or(Some(i)),
                    _ => {}
                }
            }
        });
        exits.drain_within(&mut pass, |e| {
            taken.1 += 1;
            if e.tgid == pid {
                exit_pass = Some(i);
            }
        });
        assert!(
            taken.0 <= BUDGET && taken.1 <= BUDGET,
            "pass {i} took {taken:?} records, over its budget of {BUDGET} a ring"
        );
        if pass.more {
            passes_with_more += 1;
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
        i += 1;
    }
    assert_eq!(usr1, SIGNALS, "every SIGUSR1 read, none lost to the bound");
    let kill_pass = kill_pass.expect("the SIGKILL read");
    let exit_pass = exit_pass.expect("the exit read");
    assert!(
        passes_with_more >= SIGNALS / BUDGET - 1,
        "the signals ring held more than a pass takes ({passes_with_more} passes said so)"
    );
    assert!(
        exit_pass >= kill_pass,
        "the exit was read in pass {exit_pass}, before its SIGKILL (pass {kill_pass})"
    );
    assert_eq!(signals.stats().lost, 0);
}
