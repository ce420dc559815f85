//! CFS bandwidth throttling, from `sched:sched_switch`.
//!
//! The kernel side watches every context switch but sends nothing per
//! switch: it keeps, per CPU, the few run queues (`cfs_rq`) it saw throttle
//! a running task, and sends one event when such a run queue is found
//! unthrottled again. A container is throttled at most once per CFS period
//! per CPU (10 times a second per CPU with the default 100 ms period), so
//! these events are few.

/// Open throttle intervals each CPU keeps. A CPU has one `cfs_rq` per
/// cgroup; more than this many containers throttled at once on one CPU
/// loses the extra intervals (counted as `STAT_LOST`).
pub const THROTTLE_SLOTS: usize = 8;

/// The stalled task's own cgroup was not the throttled one: a quota higher
/// up (e.g. the pod's) throttled it.
pub const THROTTLE_FLAG_ANCESTOR: u32 = 1;

/// Kernel offsets for the sched_switch probe, from BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleOffsets {
    /// `task_struct.se` + `sched_entity.cfs_rq`: the run queue the task is on.
    pub task_cfs_rq: u32,
    /// `cfs_rq.throttle_count`: > 0 while this cfs_rq or an ancestor is throttled.
    pub cfs_rq_throttle_count: u32,
    /// `cfs_rq.throttled` (an `int` before 6.18, a `bool :1` bitfield
    /// since): this run queue itself ran out of quota. Read as a u32 at this
    /// offset and masked with `cfs_rq_throttled_mask`. With a positive
    /// `throttle_count` but not `throttled`, an ancestor's quota ran out.
    pub cfs_rq_throttled: u32,
    pub cfs_rq_throttled_mask: u32,
}

/// One open interval in a CPU's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenThrottle {
    /// The throttled `cfs_rq` (kernel address); 0 is a free slot.
    pub cfs_rq: u64,
    /// `bpf_ktime_get_boot_ns()` when its running task was switched out.
    pub start_ns: u64,
    /// cgroup v2 id of that task.
    pub cgroup_id: u64,
    pub flags: u32,
    pub _pad: u32,
}

/// Per-CPU state of the probe (one entry of a per-CPU array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThrottleCpuState {
    /// Slots in use: the per-switch fast path only looks at this.
    pub open: u32,
    pub _pad: u32,
    pub slots: [OpenThrottle; THROTTLE_SLOTS],
}

/// One completed throttle of one container on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThrottleEvent {
    /// Boot-clock ns when the container's running task was switched out.
    pub start_ns: u64,
    /// ns until its run queue was seen unthrottled on that CPU.
    pub duration_ns: u64,
    /// cgroup v2 id of the stalled task.
    pub cgroup_id: u64,
    pub cpu: u32,
    /// `THROTTLE_FLAG_*`.
    pub flags: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain integers, explicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for super::ThrottleOffsets {}
    unsafe impl aya::Pod for super::ThrottleEvent {}
    unsafe impl aya::Pod for super::ThrottleCpuState {}
}
