//! Shared by the kernel tests: load the real programs into the real kernel,
//! or say clearly why not.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use aya::Ebpf;
use podscope::{
    kernel::privilege::Privileges,
    probes::{
        self, AttachType, KernelOffsets, LoadOptions,
        exits::{Exit, ExitProbe},
    },
};

/// Set by `cargo xtask test` when running as root: a kernel test that cannot
/// run is then a failure, not a skip.
pub fn required() -> bool {
    std::env::var("PODSCOPE_REQUIRE_KERNEL_TESTS").is_ok_and(|v| v == "1")
}

/// Returns false (after saying so) when this test cannot load eBPF programs.
pub fn privileged(test: &str) -> bool {
    if Privileges::current().can_trace() {
        return true;
    }
    assert!(
        !required(),
        "{test}: needs root to load eBPF programs, and PODSCOPE_REQUIRE_KERNEL_TESTS=1"
    );
    // Written to stderr directly: libtest captures eprintln!, and a skip must be visible.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root (or CAP_BPF+CAP_PERFMON) to load eBPF programs"
    );
    false
}

/// An exit probe attached to the running kernel, with its object kept alive.
pub struct Tracer {
    pub probe: ExitProbe,
    _ebpf: Ebpf,
}

impl Tracer {
    pub fn attach(only: Option<AttachType>, ring_buffer_bytes: u32) -> Tracer {
        let offsets = KernelOffsets::from_sys_fs().expect("BTF");
        let opts = LoadOptions::with_ring_buffer(ring_buffer_bytes);
        let mut ebpf = probes::load_object(&offsets, &opts).expect("load");
        let btf = probes::attach_btf();
        let probe = ExitProbe::attach(&mut ebpf, btf.as_ref(), only).expect("attach");
        Tracer { probe, _ebpf: ebpf }
    }

    /// Drains events until `pred` matches one, or `timeout` passes.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Exit) -> bool) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        let mut found = None;
        while found.is_none() && Instant::now() < deadline {
            self.probe.drain(|e| {
                if found.is_none() && pred(&e) {
                    found = Some(e);
                }
            });
            if found.is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        found
    }
}
