//! An exit probe attached to the running kernel for a scenario.

use std::time::{Duration, Instant};

use aya::Ebpf;

use super::Stop;
use crate::probes::{
    self, AttachType, KernelOffsets, LoadOptions,
    exits::{Exit, ExitProbe},
};

/// The probe, with its object kept alive (dropping it detaches).
pub struct Tracer {
    pub probe: ExitProbe,
    /// The offsets it was loaded with, for the scenarios to report.
    pub offsets: KernelOffsets,
    _ebpf: Ebpf,
}

impl Tracer {
    /// Attaches the best hook this kernel allows, or exactly `only`.
    pub fn attach(only: Option<AttachType>, ring_buffer_bytes: u32) -> Result<Tracer, Stop> {
        let offsets = KernelOffsets::from_sys_fs()?;
        let opts = LoadOptions::with_ring_buffer(ring_buffer_bytes);
        let mut ebpf = probes::load_object(&offsets, &opts)?;
        let btf = probes::attach_btf();
        let probe = ExitProbe::attach(&mut ebpf, &btf, only)?;
        Ok(Tracer {
            probe,
            offsets,
            _ebpf: ebpf,
        })
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
