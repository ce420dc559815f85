//! The exit probe's fallback hook on the real kernel: the raw_tp program
//! that reads with `bpf_probe_read_kernel` (what a kernel without its own
//! BTF, or before 5.11, gets instead of plain loads) reports an exit as the
//! typed one does. Needs root.

mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use podscope::probes::{self, AttachType, KernelOffsets, LoadOptions, exits::ExitProbe};
use support::privileged;

#[test]
fn the_probe_read_raw_tp_exit_program_reports_code_parent_and_start() {
    if !privileged("the_probe_read_raw_tp_exit_program_reports_code_parent_and_start") {
        return;
    }
    let offsets = KernelOffsets::from_sys_fs().unwrap();
    let mut ebpf = probes::load_object(&offsets, &LoadOptions::default()).unwrap();
    let mut exits = ExitProbe::attach_probed_raw_tp(&mut ebpf).unwrap();
    assert_eq!(exits.attachment.attach_type, AttachType::RawTp);

    let mut child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
    let pid = child.id();
    assert_eq!(child.wait().unwrap().code(), Some(7));

    let deadline = Instant::now() + Duration::from_secs(3);
    let mut found = None;
    while found.is_none() && Instant::now() < deadline {
        exits.drain(|e| {
            if e.tgid == pid {
                found = Some(e);
            }
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = found.expect("the exit of the child");
    assert_eq!(e.exit_code, Some(7));
    assert_eq!(e.comm, "sh");
    assert_eq!(e.ppid, std::process::id());
    assert!(!e.partial, "every read succeeded");
    assert!(!e.thread, "a process, not a lone thread");
    assert!(
        e.lifetime_ns > 0 && e.lifetime_ns < 10_000_000_000,
        "lifetime from its start time: {} ns",
        e.lifetime_ns
    );
}
