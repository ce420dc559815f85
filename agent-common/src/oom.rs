//! OOM kills, from `oom:mark_victim`: the victim chosen by the OOM killer
//! and its memory at that moment. The scope (container, pod or node) is read
//! by userspace from the cgroup files when the event arrives.

use crate::TASK_COMM_LEN;

/// Offsets inside the tracepoint's record (from tracefs `format`), or
/// [`crate::OFFSET_ABSENT`] where this kernel's record lacks the field
/// (before 6.8 the record has only `pid`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OomOffsets {
    pub tp_pid: u32,
    /// `__data_loc char[] comm`.
    pub tp_comm: u32,
    pub tp_total_vm: u32,
    pub tp_anon_rss: u32,
    pub tp_file_rss: u32,
    pub tp_shmem_rss: u32,
    pub tp_pgtables: u32,
    pub tp_oom_score_adj: u32,
    /// From BTF: the trigger's memory cgroup and its page counters up the
    /// tree, read at the moment of the OOM (the cgroup files may be gone by
    /// the time userspace looks). Any of them `OFFSET_ABSENT`: not read.
    pub task_cgroups: u32,
    pub css_set_subsys: u32,
    /// `enum cgroup_subsys_id`'s `memory_cgrp_id`.
    pub memory_cgrp_id: u32,
    /// `mem_cgroup.memory` (a page_counter; the css is at offset 0).
    pub memcg_memory: u32,
    pub pc_usage: u32,
    pub pc_max: u32,
    pub pc_watermark: u32,
    pub pc_parent: u32,
}

impl Default for OomOffsets {
    fn default() -> Self {
        let a = crate::OFFSET_ABSENT;
        OomOffsets {
            tp_pid: 8,
            tp_comm: a,
            tp_total_vm: a,
            tp_anon_rss: a,
            tp_file_rss: a,
            tp_shmem_rss: a,
            tp_pgtables: a,
            tp_oom_score_adj: a,
            task_cgroups: a,
            css_set_subsys: a,
            memory_cgrp_id: a,
            memcg_memory: a,
            pc_usage: a,
            pc_max: a,
            pc_watermark: a,
            pc_parent: a,
        }
    }
}

/// The record carried the memory figures (kernel ≥ 6.8).
pub const OOM_FLAG_FIGURES: u32 = 1 << 0;
/// A read failed; some fields are zero.
pub const OOM_FLAG_PARTIAL: u32 = 1 << 1;

/// Memory cgroup levels read, from the trigger's up: container, pod, QoS
/// class, kubepods, and one more for the node's own slices.
pub const OOM_MEMCG_LEVELS: usize = 5;

/// One memory cgroup's page counter at the OOM, in pages.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemcgLevel {
    pub usage_pages: u64,
    pub max_pages: u64,
    pub watermark_pages: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OomEvent {
    pub ts_boot_ns: u64,
    /// cgroup v2 id of the task whose allocation triggered the OOM (current).
    pub trigger_cgroup_id: u64,
    /// Victim's memory, kB (0 when the record has no figures).
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub pgtables_kb: u64,
    pub victim_pid: u32,
    pub trigger_pid: u32,
    pub trigger_tgid: u32,
    pub oom_score_adj: i32,
    pub flags: u32,
    /// How many of `memcg` were read (0: none, e.g. no memory controller).
    pub memcg_levels: u32,
    pub victim_comm: [u8; TASK_COMM_LEN],
    pub trigger_comm: [u8; TASK_COMM_LEN],
    /// The trigger's memory cgroup first, then its ancestors.
    pub memcg: [MemcgLevel; OOM_MEMCG_LEVELS],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain integers and bytes, valid for any bit pattern.
    unsafe impl aya::Pod for super::OomOffsets {}
    unsafe impl aya::Pod for super::OomEvent {}
}
