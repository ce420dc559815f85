//! Per-family counters (see `agent_common::stats`).

use aya_ebpf::maps::PerCpuArray;

#[inline(always)]
pub fn bump(map: &PerCpuArray<u64>, slot: u32) {
    if let Some(counter) = map.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}
