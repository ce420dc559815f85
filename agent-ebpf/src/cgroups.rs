//! cgroup v2 directory creation and removal: the id → path mapping that
//! attributes every other event to its container (see agent_common::cgroups).
//! Only the v2 hierarchy (id 0) matters: its ids are what
//! `bpf_get_current_cgroup_id()` returns. Rare events: a wakeup per event.

use agent_common::{
    cgroups::{
        CGROUP_FIRST_EXEC, CGROUP_FLAG_TRUNCATED, CGROUP_MKDIR, CGROUP_PATH_MAX, CGROUP_RMDIR,
        CgroupEvent, CgroupOffsets,
    },
    stats::{STAT_EMITTED, STAT_FILTERED, STAT_HITS, STAT_LOST, STAT_READ_ERRORS, STAT_SLOTS},
};
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes,
    },
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
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
    _pad: 0,
};

#[map]
static CGROUP_EVENTS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

#[map]
static CGROUP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

#[raw_tracepoint(tracepoint = "cgroup_mkdir")]
pub fn cgroup_mkdir_raw_tp(ctx: RawTracePointContext) -> i32 {
    from_args(ctx.arg(0), ctx.arg(1), CGROUP_MKDIR);
    0
}

#[raw_tracepoint(tracepoint = "cgroup_rmdir")]
pub fn cgroup_rmdir_raw_tp(ctx: RawTracePointContext) -> i32 {
    from_args(ctx.arg(0), ctx.arg(1), CGROUP_RMDIR);
    0
}

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn cgroup_mkdir_tp_btf(ctx: BtfTracePointContext) -> i32 {
    from_args(ctx.arg(0), ctx.arg(1), CGROUP_MKDIR);
    0
}

#[btf_tracepoint(function = "cgroup_rmdir")]
pub fn cgroup_rmdir_tp_btf(ctx: BtfTracePointContext) -> i32 {
    from_args(ctx.arg(0), ctx.arg(1), CGROUP_RMDIR);
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

/// v2 cgroups created since start-up whose first exec has not been seen.
/// The first program executed in a container's cgroup is its entrypoint:
/// the container's main process (the runtime's bootstrap processes, e.g.
/// runc's `runc:[0:PARENT]`, enter the cgroup first but never exec).
#[map]
static AWAITING_EXEC: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16_384, 0);

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn cgroup_exec_raw_tp(_ctx: RawTracePointContext) -> i32 {
    on_exec();
    0
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn cgroup_exec_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    on_exec();
    0
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn cgroup_exec_tracepoint(_ctx: TracePointContext) -> u32 {
    on_exec();
    0
}

/// Every exec costs one hash lookup; only a new cgroup's first exec is sent.
#[inline(always)]
fn on_exec() {
    let id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is not read, only its presence.
    if unsafe { AWAITING_EXEC.get(&id) }.is_none() {
        return;
    }
    let _ = AWAITING_EXEC.remove(&id);
    bump(&CGROUP_STATS, STAT_HITS);
    let Some(mut entry) = CGROUP_EVENTS.reserve::<CgroupEvent>(0) else {
        bump(&CGROUP_STATS, STAT_LOST);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the reserved entry is ours until submit.
    unsafe {
        (*event).id = id;
        (*event).op = CGROUP_FIRST_EXEC;
        (*event).flags = 0;
        (*event).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
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

/// raw_tp and tp_btf: the tracepoint's arguments `(struct cgroup *cgrp,
/// const char *path)`, only read through probe helpers.
#[inline(always)]
fn from_args(cgrp: *const u8, path: *const u8, op: u32) {
    bump(&CGROUP_STATS, STAT_HITS);
    let off = offsets();
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
    if op == CGROUP_MKDIR {
        let _ = AWAITING_EXEC.insert(&id, &0, 0);
    } else {
        let _ = AWAITING_EXEC.remove(&id);
    }
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
