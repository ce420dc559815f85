//! CFS bandwidth throttling: `sched:sched_switch` (see agent_common::throttle).
//!
//! sched_switch is the hottest tracepoint in the kernel, so the common path
//! is two loads and two branches: the per-CPU state's `open` count (no
//! interval open on this CPU: nothing to close) and `prev_state` (the task
//! went to sleep by itself: it was not throttled). Only a preempted task
//! costs two kernel reads (its cfs_rq and that run queue's throttle count).
//!
//! A throttled task is switched out while still `current`, so
//! `bpf_get_current_cgroup_id()` names its container. The interval is keyed
//! by its `cfs_rq`, which is per CPU, and closed at the first switch on that
//! CPU after the run queue's `throttle_count` fell back to 0: unthrottling
//! enqueues the group again and reschedules the CPU, so that switch follows
//! the unthrottle closely. Closing per CPU (not when the task runs again)
//! keeps the measure right when the task is migrated after the unthrottle.
//!
//! The `throttle_count` covers the task's own cgroup and every ancestor, so
//! a pod-level quota's throttle is seen too; it is attributed to the
//! container whose task stalled, flagged `THROTTLE_FLAG_ANCESTOR`.
//!
//! Output: one ring-buffer event per completed throttle (few per second per
//! container and CPU), never one per switch; userspace aggregates them.

use agent_common::{
    stats::{STAT_EMITTED, STAT_FILTERED, STAT_HITS, STAT_LOST, STAT_READ_ERRORS, STAT_SLOTS},
    throttle::{
        OpenThrottle, THROTTLE_FLAG_ANCESTOR, THROTTLE_SLOTS, ThrottleCpuState, ThrottleEvent,
        ThrottleOffsets,
    },
};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_cgroup_id, bpf_get_smp_processor_id, bpf_ktime_get_boot_ns},
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};

use crate::{kmem, ringbuf, stats::bump};

#[unsafe(no_mangle)]
static THROTTLE_OFFSETS: ThrottleOffsets = ThrottleOffsets {
    task_cfs_rq: 0,
    cfs_rq_throttle_count: 0,
    cfs_rq_throttled: 0,
    cfs_rq_throttled_mask: 0,
};

#[map]
static THROTTLE_EVENTS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

#[map]
static THROTTLE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

#[map]
static THROTTLE_STATE: PerCpuArray<ThrottleCpuState> = PerCpuArray::with_max_entries(1, 0);

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)`: the same arguments for tp_btf and raw_tp
/// (`prev_state` since 5.18).
#[btf_tracepoint(function = "sched_switch")]
pub fn throttle_tp_btf(ctx: BtfTracePointContext) -> i32 {
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let prev_state: u64 = ctx.arg(3);
    on_switch(preempt, prev, prev_state);
    0
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn throttle_raw_tp(ctx: RawTracePointContext) -> i32 {
    // SAFETY: raw_tp arguments are the tracepoint's u64 slots, in order.
    let args = ctx.as_ptr() as *const u64;
    let (preempt, prev, prev_state) = unsafe { (*args, *args.add(1) as *const u8, *args.add(3)) };
    on_switch(preempt, prev, prev_state);
    0
}

#[inline(always)]
fn on_switch(preempt: u64, prev: *const u8, prev_state: u64) {
    let Some(state) = THROTTLE_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's own entry; nothing else runs this program on this
    // CPU while it runs (tracepoint programs do not nest on one CPU).
    let state = unsafe { &mut *state };
    // Only a task switched out while runnable (preempted, or throttled on
    // its way back to user mode, which leaves its state TASK_RUNNING) can
    // have been stalled by its quota; a task that blocks was not. This is
    // most switches: with nothing open on this CPU they end here.
    let blocked = preempt as u8 == 0 && prev_state as u32 != 0;
    if blocked && state.open == 0 {
        return;
    }
    // SAFETY: a volatile read keeps the load-time value from being folded.
    let off = unsafe { core::ptr::read_volatile(&THROTTLE_OFFSETS) };
    if state.open != 0 {
        close_unthrottled(state, &off);
    }
    if blocked {
        return;
    }
    let Ok(cfs_rq) = kmem::read_ptr(prev, off.task_cfs_rq) else {
        return;
    };
    match kmem::read::<i32>(cfs_rq, off.cfs_rq_throttle_count) {
        Ok(n) if n > 0 => open(state, &off, cfs_rq as u64),
        _ => {}
    }
}

#[inline(always)]
fn open(state: &mut ThrottleCpuState, off: &ThrottleOffsets, cfs_rq: u64) {
    bump(&THROTTLE_STATS, STAT_HITS);
    let mut free = THROTTLE_SLOTS;
    for i in 0..THROTTLE_SLOTS {
        let slot = &state.slots[i];
        if slot.cfs_rq == cfs_rq {
            // Already open: another task of the same run queue (kernels that
            // throttle each task on its way back to user mode switch each out).
            bump(&THROTTLE_STATS, STAT_FILTERED);
            return;
        }
        if slot.cfs_rq == 0 && free == THROTTLE_SLOTS {
            free = i;
        }
    }
    if free >= THROTTLE_SLOTS {
        bump(&THROTTLE_STATS, STAT_LOST);
        return;
    }
    let own = kmem::read::<u32>(cfs_rq as *const u8, off.cfs_rq_throttled)
        .map_or(1, |v| v & off.cfs_rq_throttled_mask);
    state.slots[free] = OpenThrottle {
        cfs_rq,
        start_ns: unsafe { bpf_ktime_get_boot_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        flags: if own == 0 { THROTTLE_FLAG_ANCESTOR } else { 0 },
        _pad: 0,
    };
    state.open += 1;
}

#[inline(always)]
fn close_unthrottled(state: &mut ThrottleCpuState, off: &ThrottleOffsets) {
    for i in 0..THROTTLE_SLOTS {
        let slot = state.slots[i];
        if slot.cfs_rq == 0 {
            continue;
        }
        let count = kmem::read::<i32>(slot.cfs_rq as *const u8, off.cfs_rq_throttle_count);
        match count {
            Ok(n) if n > 0 => continue,
            Ok(_) => emit(&slot),
            // The cgroup is gone (its cfs_rq freed): the interval cannot be closed.
            Err(_) => bump(&THROTTLE_STATS, STAT_READ_ERRORS),
        }
        state.slots[i].cfs_rq = 0;
        state.open = state.open.saturating_sub(1);
    }
}

#[inline(always)]
fn emit(slot: &OpenThrottle) {
    let Some(mut entry) = THROTTLE_EVENTS.reserve::<ThrottleEvent>(0) else {
        bump(&THROTTLE_STATS, STAT_LOST);
        return;
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    entry.write(ThrottleEvent {
        start_ns: slot.start_ns,
        duration_ns: now.saturating_sub(slot.start_ns),
        cgroup_id: slot.cgroup_id,
        cpu: unsafe { bpf_get_smp_processor_id() },
        flags: slot.flags,
    });
    ringbuf::submit(&THROTTLE_EVENTS, entry);
    bump(&THROTTLE_STATS, STAT_EMITTED);
}
