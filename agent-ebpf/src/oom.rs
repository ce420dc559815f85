//! OOM kills: `oom:mark_victim`. The plain tracepoint, because its record is
//! where the victim's memory figures are (kernel ≥ 6.8; only `pid` before),
//! and its argument changed type across kernels (pid, then task pointer).
//! A few events a day: cost does not matter, promptness does, so every
//! event wakes the reader (userspace reads the cgroup files for the OOM's
//! scope before the container's cgroup disappears).

use agent_common::{
    OFFSET_ABSENT, TASK_COMM_LEN,
    oom::{MemcgLevel, OOM_FLAG_FIGURES, OOM_MEMCG_LEVELS, OomEvent, OomOffsets},
    stats::{STAT_EMITTED, STAT_HITS, STAT_LOST, STAT_SLOTS},
};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_ktime_get_boot_ns, bpf_probe_read_kernel_str_bytes, generated,
    },
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
};

use crate::{kmem, stats::bump};

#[unsafe(no_mangle)]
static OOM_OFFSETS: OomOffsets = OomOffsets {
    tp_pid: 8,
    tp_comm: OFFSET_ABSENT,
    tp_total_vm: OFFSET_ABSENT,
    tp_anon_rss: OFFSET_ABSENT,
    tp_file_rss: OFFSET_ABSENT,
    tp_shmem_rss: OFFSET_ABSENT,
    tp_pgtables: OFFSET_ABSENT,
    tp_oom_score_adj: OFFSET_ABSENT,
    task_cgroups: OFFSET_ABSENT,
    css_set_subsys: OFFSET_ABSENT,
    memory_cgrp_id: OFFSET_ABSENT,
    memcg_memory: OFFSET_ABSENT,
    pc_usage: OFFSET_ABSENT,
    pc_max: OFFSET_ABSENT,
    pc_watermark: OFFSET_ABSENT,
    pc_parent: OFFSET_ABSENT,
};

#[map]
static OOM_EVENTS: RingBuf = RingBuf::with_byte_size(64 << 10, 0);

#[map]
static OOM_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

#[tracepoint(category = "oom", name = "mark_victim")]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    on_mark_victim(&ctx);
    0
}

/// Copies `size_of::<T>()` bytes from `base + off` into `dst`, or zeroes
/// `dst` when the record lacks the field. No branch on the read's outcome
/// (the helper zeroes `dst` when it fails): every branch multiplies the paths
/// the verifier walks, and 6.1's gives up on this program otherwise.
#[inline(always)]
unsafe fn copy_into<T>(dst: *mut T, base: *const u8, off: u32) {
    if off == OFFSET_ABSENT {
        unsafe { core::ptr::write_bytes(dst, 0, 1) };
        return;
    }
    unsafe {
        generated::bpf_probe_read_kernel(
            dst.cast(),
            size_of::<T>() as u32,
            base.wrapping_add(off as usize).cast(),
        )
    };
}

#[inline(always)]
fn on_mark_victim(ctx: &TracePointContext) {
    bump(&OOM_STATS, STAT_HITS);
    // SAFETY: a volatile read keeps the load-time value from being folded.
    let off = unsafe { core::ptr::read_volatile(&OOM_OFFSETS) };
    let base = ctx.as_ptr() as *const u8;
    // Stamped before the reservation: whatever is reserved after this
    // record (and any exit it causes) is stamped after it. Userspace's
    // ordered drain relies on that (an exit is never read before the
    // signal that caused it: probes::Pass).
    // SAFETY: reads the boot clock; no memory is touched.
    let stamp = unsafe { bpf_ktime_get_boot_ns() };
    let Some(mut entry) = OOM_EVENTS.reserve::<OomEvent>(0) else {
        bump(&OOM_STATS, STAT_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the reserved entry is ours until submit; every field is written.
    unsafe {
        (*ev).ts_boot_ns = stamp;
        (*ev).trigger_cgroup_id = bpf_get_current_cgroup_id();
        (*ev).trigger_pid = pid_tgid as u32;
        (*ev).trigger_tgid = (pid_tgid >> 32) as u32;
        (*ev).flags = if off.tp_anon_rss != OFFSET_ABSENT {
            OOM_FLAG_FIGURES
        } else {
            0
        };
        copy_into(&raw mut (*ev).victim_pid, base, off.tp_pid);
        copy_into(&raw mut (*ev).total_vm_kb, base, off.tp_total_vm);
        copy_into(&raw mut (*ev).anon_rss_kb, base, off.tp_anon_rss);
        copy_into(&raw mut (*ev).file_rss_kb, base, off.tp_file_rss);
        copy_into(&raw mut (*ev).shmem_rss_kb, base, off.tp_shmem_rss);
        copy_into(&raw mut (*ev).pgtables_kb, base, off.tp_pgtables);
        // A short in the record; the event's i32 gets it sign-extended below.
        let mut adj: i16 = 0;
        copy_into(&raw mut adj, base, off.tp_oom_score_adj);
        (*ev).oom_score_adj = adj as i32;
        (*ev).victim_comm = [0u8; TASK_COMM_LEN];
        if off.tp_comm != OFFSET_ABSENT {
            let mut loc: u32 = 0;
            copy_into(&raw mut loc, base, off.tp_comm);
            let at = base.wrapping_add((loc & 0xffff) as usize);
            // A failed read leaves the name empty; userspace takes it from the exit.
            let _ = bpf_probe_read_kernel_str_bytes(at, &mut (*ev).victim_comm);
        }
        (*ev).trigger_comm = bpf_get_current_comm().unwrap_or([0u8; TASK_COMM_LEN]);
        (*ev).memcg_levels = read_memcg(&off, &mut (*ev).memcg);
    }
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
    bump(&OOM_STATS, STAT_EMITTED);
}

/// The current task's memory cgroup page counters, innermost first: which
/// limit the failed charge hit is the level whose usage reached its max.
#[inline(always)]
fn read_memcg(off: &OomOffsets, out: &mut [MemcgLevel; OOM_MEMCG_LEVELS]) -> u32 {
    *out = [MemcgLevel::default(); OOM_MEMCG_LEVELS];
    if off.pc_parent == OFFSET_ABSENT || off.memory_cgrp_id == OFFSET_ABSENT {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let slot = off.css_set_subsys + (off.memory_cgrp_id & 63) * 8;
    let css = kmem::read_ptr(task, off.task_cgroups)
        .and_then(|cset| kmem::read_ptr(cset, slot))
        .unwrap_or(core::ptr::null());
    // The css is the first member of struct mem_cgroup.
    let mut counter = if css.is_null() {
        css
    } else {
        css.wrapping_add(off.memcg_memory as usize)
    };
    let mut n = 0u32;
    for level in out.iter_mut() {
        if counter.is_null() {
            break;
        }
        // SAFETY: probe reads into our own memory; failures leave zeroes.
        unsafe {
            copy_into(&raw mut level.usage_pages, counter, off.pc_usage);
            copy_into(&raw mut level.max_pages, counter, off.pc_max);
            copy_into(&raw mut level.watermark_pages, counter, off.pc_watermark);
            let mut parent: *const u8 = core::ptr::null();
            copy_into(&raw mut parent, counter, off.pc_parent);
            counter = parent;
        }
        n += 1;
    }
    n
}
