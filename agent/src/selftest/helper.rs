//! Workloads the scenarios start as separate processes, run by the
//! kernel-test binary itself (`podscope-kernel-tests --helper MODE`): the VMs
//! have busybox and nothing else, so no python or compiler to write them in.

use std::{process::ExitCode, time::Duration};

/// Four threads sleep while the process exits with this status: the other
/// threads must fold into the process's one event.
pub const THREADS_THEN_EXIT: &str = "threads-then-exit";
pub const THREADS_THEN_EXIT_STATUS: u8 = 7;

/// Spins on one thread until killed (at most a minute): a CPU-bound
/// workload for the throttling scenarios.
pub const SPIN: &str = "spin";

/// Runs a helper mode; never returns for a known mode.
pub fn run(mode: &str) -> ExitCode {
    match mode {
        THREADS_THEN_EXIT => {
            // Each thread says it runs before the process exits.
            let (tx, rx) = std::sync::mpsc::channel();
            for _ in 0..4 {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(());
                    std::thread::sleep(Duration::from_secs(30))
                });
            }
            for _ in 0..4 {
                let _ = rx.recv_timeout(Duration::from_secs(30));
            }
            // SAFETY: _exit ends the whole process at once, threads included,
            // which is the point (no unwinding or joining).
            unsafe { libc::_exit(i32::from(THREADS_THEN_EXIT_STATUS)) }
        }
        SPIN => {
            let end = std::time::Instant::now() + Duration::from_secs(60);
            let mut x = 0u64;
            while std::time::Instant::now() < end {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("podscope-kernel-tests: unknown helper mode `{other}`");
            ExitCode::from(2)
        }
    }
}
