//! cgroup v2 directory creation and removal: the id → path mapping that
//! attributes every other event to its container (see agent_common::cgroups).
//! Only the v2 hierarchy (id 0) matters: its ids are what
//! `bpf_get_current_cgroup_id()` returns. Rare events: a wakeup per event.

use agent_common::{
    cgroups::{
        CGROUP_ATTACH, CGROUP_FLAG_TRUNCATED, CGROUP_MKDIR, CGROUP_PATH_MAX, CGROUP_RMDIR,
        CgroupEvent, CgroupOffsets,
    },
    stats::{STAT_EMITTED, STAT_FILTERED, STAT_HITS, STAT_LOST, STAT_READ_ERRORS, STAT_SLOTS},
};
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_probe_read_kernel_str_bytes,
    macros::{btf_tracepoint, map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};

use crate::{kmem, stats::bump};

#[unsafe(no_mangle)]
static CGROUP_OFFSETS: CgroupOffsets = CgroupOffsets {
    cgroup_kn: 0,
    kn_id: 0,
    cgroup_root: 0,
    root_hierarchy_id: 0,
    tp_root: 0,
    tp_id: 0,
    tp_path: 0,
    task_tgid: 0,
    tp_attach_root: 0,
    tp_attach_id: 0,
    tp_attach_pid: 0,
    _pad: 0,
};

#[map]
static CGROUP_EVENTS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

#[map]
static CGROUP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn cgroup_mkdir_tp_btf(ctx: BtfTracePointContext) -> i32 {
    from_btf(&ctx, CGROUP_MKDIR);
    0
}

#[btf_tracepoint(function = "cgroup_rmdir")]
pub fn cgroup_rmdir_tp_btf(ctx: BtfTracePointContext) -> i32 {
    from_btf(&ctx, CGROUP_RMDIR);
    0
}

#[tracepoint(category = "cgroup", name = "cgroup_mkdir")]
pub fn cgroup_mkdir_tracepoint(ctx: TracePointContext) -> u32 {
    from_record(&ctx, CGROUP_MKDIR);
    0
}

#[tracepoint(category = "cgroup", name = "cgroup_rmdir")]
pub fn cgroup_rmdir_tracepoint(ctx: TracePointContext) -> u32 {
    from_record(&ctx, CGROUP_RMDIR);
    0
}

/// tp_btf: `(struct cgroup *dst_cgrp, const char *path, struct task_struct
/// *task, bool threadgroup)`. Which process entered a container's cgroup
/// first tells userspace the container's main process, the one whose end is
/// the container's end.
#[btf_tracepoint(function = "cgroup_attach_task")]
pub fn cgroup_attach_tp_btf(ctx: BtfTracePointContext) -> i32 {
    bump(&CGROUP_STATS, STAT_HITS);
    let off = offsets();
    let cgrp: *const u8 = ctx.arg(0);
    let task: *const u8 = ctx.arg(2);
    let hierarchy = kmem::read_ptr(cgrp, off.cgroup_root)
        .and_then(|root| kmem::read::<i32>(root, off.root_hierarchy_id));
    let id = kmem::read_ptr(cgrp, off.cgroup_kn).and_then(|kn| kmem::read::<u64>(kn, off.kn_id));
    let tgid = kmem::read::<u32>(task, off.task_tgid);
    match (hierarchy, id, tgid) {
        (Ok(0), Ok(id), Ok(tgid)) => emit_attach(id, tgid),
        (Ok(_), Ok(_), Ok(_)) => bump(&CGROUP_STATS, STAT_FILTERED),
        _ => bump(&CGROUP_STATS, STAT_READ_ERRORS),
    }
    0
}

#[tracepoint(category = "cgroup", name = "cgroup_attach_task")]
pub fn cgroup_attach_tracepoint(ctx: TracePointContext) -> u32 {
    bump(&CGROUP_STATS, STAT_HITS);
    let off = offsets();
    let base = ctx.as_ptr() as *const u8;
    let root = kmem::read::<i32>(base, off.tp_attach_root);
    let id = kmem::read::<u64>(base, off.tp_attach_id);
    // The record's pid is the moved task's: the group leader when a whole
    // process moves (cgroup.procs), which is the tgid.
    let pid = kmem::read::<u32>(base, off.tp_attach_pid);
    match (root, id, pid) {
        (Ok(0), Ok(id), Ok(pid)) => emit_attach(id, pid),
        (Ok(_), Ok(_), Ok(_)) => bump(&CGROUP_STATS, STAT_FILTERED),
        _ => bump(&CGROUP_STATS, STAT_READ_ERRORS),
    }
    0
}

#[inline(always)]
fn emit_attach(id: u64, tgid: u32) {
    let Some(mut entry) = CGROUP_EVENTS.reserve::<CgroupEvent>(0) else {
        bump(&CGROUP_STATS, STAT_LOST);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the reserved entry is ours until submit.
    unsafe {
        (*event).id = id;
        (*event).op = CGROUP_ATTACH;
        (*event).flags = 0;
        (*event).pid = tgid;
        (*event)._pad = 0;
        (*event).path[0] = 0;
    }
    entry.submit(0);
    bump(&CGROUP_STATS, STAT_EMITTED);
}

#[inline(always)]
fn offsets() -> CgroupOffsets {
    // SAFETY: a volatile read keeps the load-time value from being folded.
    unsafe { core::ptr::read_volatile(&CGROUP_OFFSETS) }
}

/// tp_btf: `(struct cgroup *cgrp, const char *path)`.
#[inline(always)]
fn from_btf(ctx: &BtfTracePointContext, op: u32) {
    bump(&CGROUP_STATS, STAT_HITS);
    let off = offsets();
    // The tracepoint's first two arguments; only read through probe helpers.
    let cgrp: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    let hierarchy = kmem::read_ptr(cgrp, off.cgroup_root)
        .and_then(|root| kmem::read::<i32>(root, off.root_hierarchy_id));
    let id = kmem::read_ptr(cgrp, off.cgroup_kn).and_then(|kn| kmem::read::<u64>(kn, off.kn_id));
    match (hierarchy, id) {
        (Ok(0), Ok(id)) => emit(op, id, path),
        (Ok(_), Ok(_)) => bump(&CGROUP_STATS, STAT_FILTERED),
        _ => bump(&CGROUP_STATS, STAT_READ_ERRORS),
    }
}

/// Plain tracepoint: the record's `root`, `id` and `__data_loc path`, at
/// offsets read from tracefs.
#[inline(always)]
fn from_record(ctx: &TracePointContext, op: u32) {
    bump(&CGROUP_STATS, STAT_HITS);
    let off = offsets();
    let base = ctx.as_ptr() as *const u8;
    let root = kmem::read::<i32>(base, off.tp_root);
    let id = kmem::read::<u64>(base, off.tp_id);
    let loc = kmem::read::<u32>(base, off.tp_path);
    match (root, id, loc) {
        (Ok(0), Ok(id), Ok(loc)) => emit(op, id, base.wrapping_add((loc & 0xffff) as usize)),
        (Ok(_), Ok(_), Ok(_)) => bump(&CGROUP_STATS, STAT_FILTERED),
        _ => bump(&CGROUP_STATS, STAT_READ_ERRORS),
    }
}

#[inline(always)]
fn emit(op: u32, id: u64, path: *const u8) {
    let Some(mut entry) = CGROUP_EVENTS.reserve::<CgroupEvent>(0) else {
        bump(&CGROUP_STATS, STAT_LOST);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the reserved entry is ours until submit; fields are written in place
    // because the 256-byte path does not fit on the BPF stack next to a copy.
    unsafe {
        (*event).id = id;
        (*event).op = op;
        (*event).flags = 0;
        (*event).pid = 0;
        (*event)._pad = 0;
        let buf = &mut (*event).path;
        match bpf_probe_read_kernel_str_bytes(path, buf) {
            Ok(s) if s.len() >= CGROUP_PATH_MAX - 1 => (*event).flags = CGROUP_FLAG_TRUNCATED,
            Ok(_) => {}
            Err(_) => {
                buf[0] = 0;
                bump(&CGROUP_STATS, STAT_READ_ERRORS);
            }
        }
    }
    entry.submit(0);
    bump(&CGROUP_STATS, STAT_EMITTED);
}
