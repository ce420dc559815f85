//! OOM kills: `oom:mark_victim`. The plain tracepoint, because its record is
//! where the victim's memory figures are (kernel ≥ 6.8; only `pid` before),
//! and its argument changed type across kernels (pid, then task pointer).
//! A few events a day: cost does not matter, promptness does, so every
//! event wakes the reader (userspace reads the cgroup files for the OOM's
//! scope before the container's cgroup disappears).

use agent_common::{
    OFFSET_ABSENT, TASK_COMM_LEN,
    oom::{MemcgLevel, OOM_FLAG_FIGURES, OOM_FLAG_PARTIAL, OOM_MEMCG_LEVELS, OomEvent, OomOffsets},
    stats::{STAT_EMITTED, STAT_HITS, STAT_LOST, STAT_READ_ERRORS, STAT_SLOTS},
};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_ktime_get_boot_ns, bpf_probe_read_kernel_str_bytes,
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

/// A record field, 0 where this kernel's record lacks it. Read failures are
/// not tracked per field: merging them into flags multiplies the paths the
/// verifier walks (6.1's gives up), and the record is the kernel's own memory.
#[inline(always)]
fn field<T: Default>(base: *const u8, off: u32) -> T {
    if off == OFFSET_ABSENT {
        return T::default();
    }
    kmem::read::<T>(base, off).unwrap_or_default()
}

#[inline(always)]
fn on_mark_victim(ctx: &TracePointContext) {
    bump(&OOM_STATS, STAT_HITS);
    // SAFETY: a volatile read keeps the load-time value from being folded.
    let off = unsafe { core::ptr::read_volatile(&OOM_OFFSETS) };
    let base = ctx.as_ptr() as *const u8;
    let Some(mut entry) = OOM_EVENTS.reserve::<OomEvent>(0) else {
        bump(&OOM_STATS, STAT_LOST);
        return;
    };
    let mut flags = 0u32;
    if off.tp_anon_rss != OFFSET_ABSENT {
        flags |= OOM_FLAG_FIGURES;
    }
    let victim_pid = match kmem::read::<i32>(base, off.tp_pid) {
        Ok(p) => p as u32,
        Err(_) => {
            flags |= OOM_FLAG_PARTIAL;
            0
        }
    };
    let total_vm_kb = field::<u64>(base, off.tp_total_vm);
    let anon_rss_kb = field::<u64>(base, off.tp_anon_rss);
    let file_rss_kb = field::<u64>(base, off.tp_file_rss);
    let shmem_rss_kb = field::<u64>(base, off.tp_shmem_rss);
    let pgtables_kb = field::<u64>(base, off.tp_pgtables);
    let oom_score_adj = field::<i16>(base, off.tp_oom_score_adj) as i32;
    let mut victim_comm = [0u8; TASK_COMM_LEN];
    if off.tp_comm != OFFSET_ABSENT {
        let loc = field::<u32>(base, off.tp_comm);
        let at = base.wrapping_add((loc & 0xffff) as usize);
        // SAFETY: probe-read helper, tolerant of bad addresses; a failed
        // read leaves the name empty and userspace takes it from the exit.
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(at, &mut victim_comm) };
    }
    if flags & OOM_FLAG_PARTIAL != 0 {
        bump(&OOM_STATS, STAT_READ_ERRORS);
    }
    let mut memcg = [MemcgLevel::default(); OOM_MEMCG_LEVELS];
    let memcg_levels = read_memcg(&off, &mut memcg);
    let pid_tgid = bpf_get_current_pid_tgid();
    entry.write(OomEvent {
        ts_boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        trigger_cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        total_vm_kb,
        anon_rss_kb,
        file_rss_kb,
        shmem_rss_kb,
        pgtables_kb,
        victim_pid,
        trigger_pid: pid_tgid as u32,
        trigger_tgid: (pid_tgid >> 32) as u32,
        oom_score_adj,
        flags,
        memcg_levels,
        victim_comm,
        trigger_comm: bpf_get_current_comm().unwrap_or([0u8; TASK_COMM_LEN]),
        memcg,
    });
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
    bump(&OOM_STATS, STAT_EMITTED);
}

/// The current task's memory cgroup page counters, innermost first: which
/// limit the failed charge hit is the level whose usage reached its max.
#[inline(always)]
fn read_memcg(off: &OomOffsets, out: &mut [MemcgLevel; OOM_MEMCG_LEVELS]) -> u32 {
    if off.pc_parent == OFFSET_ABSENT || off.memory_cgrp_id == OFFSET_ABSENT {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let slot = off.css_set_subsys + (off.memory_cgrp_id & 63) * 8;
    let Ok(css) =
        kmem::read_ptr(task, off.task_cgroups).and_then(|cset| kmem::read_ptr(cset, slot))
    else {
        return 0;
    };
    // The css is the first member of struct mem_cgroup.
    let mut counter = css.wrapping_add(off.memcg_memory as usize);
    let mut n = 0u32;
    for level in out.iter_mut() {
        if counter.is_null() {
            break;
        }
        let (Ok(usage), Ok(max)) = (
            kmem::read::<u64>(counter, off.pc_usage),
            kmem::read::<u64>(counter, off.pc_max),
        ) else {
            break;
        };
        level.usage_pages = usage;
        level.max_pages = max;
        level.watermark_pages = kmem::read::<u64>(counter, off.pc_watermark).unwrap_or(0);
        n += 1;
        counter = kmem::read_ptr(counter, off.pc_parent).unwrap_or(core::ptr::null());
    }
    n
}
