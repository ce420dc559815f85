//! cgroup creation and removal, from `cgroup:cgroup_mkdir` / `cgroup_rmdir`.
//!
//! A container's cgroup directory vanishes as soon as it exits, often before
//! userspace sees the exit event: podscope learns every cgroup id → path
//! mapping when the directory is created, not when an event needs it.

/// Bytes of the path kept; kubelet's longest (systemd driver, CRI-O) are ~170.
pub const CGROUP_PATH_MAX: usize = 256;

pub const CGROUP_MKDIR: u32 = 1;
pub const CGROUP_RMDIR: u32 = 2;
/// The first exec in a v2 cgroup created since start-up
/// (`sched:sched_process_exec`): in a container's cgroup, its entrypoint.
pub const CGROUP_FIRST_EXEC: u32 = 3;

/// The path did not fit in `CGROUP_PATH_MAX` bytes.
pub const CGROUP_FLAG_TRUNCATED: u32 = 1;

/// Kernel offsets for the tp_btf programs (from BTF) and the plain
/// tracepoints' record layout (from tracefs `format`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupOffsets {
    /// `cgroup.kn` (pointer to its kernfs_node).
    pub cgroup_kn: u32,
    /// `kernfs_node.id`: the cgroup id, as `bpf_get_current_cgroup_id()` gives.
    pub kn_id: u32,
    /// `cgroup.root` (pointer to its cgroup_root).
    pub cgroup_root: u32,
    /// `cgroup_root.hierarchy_id`: 0 is the v2 (default) hierarchy.
    pub root_hierarchy_id: u32,
    /// Plain tracepoint record: `root`, `id`, `path` (a __data_loc).
    pub tp_root: u32,
    pub tp_id: u32,
    pub tp_path: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgroupEvent {
    pub id: u64,
    /// `CGROUP_MKDIR`, `CGROUP_RMDIR` or `CGROUP_FIRST_EXEC`.
    pub op: u32,
    pub flags: u32,
    /// The process that exec'd (`CGROUP_FIRST_EXEC`): its tgid.
    pub pid: u32,
    pub _pad: u32,
    /// Empty for `CGROUP_FIRST_EXEC`. NUL-terminated path relative to the v2 root, e.g. `/kubepods/burstable/pod…/…`.
    pub path: [u8; CGROUP_PATH_MAX],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain integers and bytes, valid for any bit pattern.
    unsafe impl aya::Pod for super::CgroupOffsets {}
    unsafe impl aya::Pod for super::CgroupEvent {}
}
