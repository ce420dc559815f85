//! Process and thread exits, from `sched:sched_process_exit`.

use crate::TASK_COMM_LEN;

/// Kernel struct-member byte offsets the exit probe needs. Rust eBPF has no
/// CO-RE relocations, so userspace resolves these from the running kernel's
/// BTF and sets them as a global when it loads the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitOffsets {
    /// `task_struct.real_parent` (pointer).
    pub task_real_parent: u32,
    /// `task_struct.group_leader` (pointer).
    pub task_group_leader: u32,
    /// `task_struct.tgid`.
    pub task_tgid: u32,
    /// `task_struct.exit_code`: a wait(2) status.
    pub task_exit_code: u32,
    /// `task_struct.start_boottime`: ns since boot, like `bpf_ktime_get_boot_ns`.
    pub task_start_boottime: u32,
    /// `task_struct.comm`.
    pub task_comm: u32,
    /// `task_struct.signal` (pointer to `signal_struct`).
    pub task_signal: u32,
    /// `signal_struct.live`: threads still alive; 0 once the last one exits.
    pub signal_live: u32,
    /// `signal_struct.flags`: `SIGNAL_GROUP_EXIT` when the whole group is exiting.
    pub signal_flags: u32,
    /// `signal_struct.group_exec_task` (≥ 5.17), or [`crate::OFFSET_ABSENT`]:
    /// set while execve() tears down the other threads.
    pub signal_group_exec_task: u32,
}

/// `SIGNAL_GROUP_EXIT` from include/linux/sched/signal.h: a `#define`, so not
/// in BTF, but unchanged since 2.6.
pub const SIGNAL_GROUP_EXIT: u32 = 0x0000_0004;

/// The last thread of the process ended: the process is gone.
pub const EXIT_FLAG_GROUP_DEAD: u32 = 1 << 0;
/// A kernel read failed while building this event; some fields may be zero.
pub const EXIT_FLAG_PARTIAL: u32 = 1 << 1;

/// One exit, as the kernel side writes it into the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    /// `bpf_ktime_get_boot_ns()` at the exit.
    pub ts_boot_ns: u64,
    /// Start of the process (of the thread for a thread exit), ns since boot.
    pub start_boot_ns: u64,
    /// cgroup v2 id (inode of the task's v2 cgroup directory).
    pub cgroup_id: u64,
    pub pid: u32,
    pub tgid: u32,
    pub ppid: u32,
    /// `task_struct.exit_code`: `status << 8`, or the signal in the low 7 bits
    /// with 0x80 for a core dump.
    pub wait_status: u32,
    /// `EXIT_FLAG_*`.
    pub flags: u32,
    pub _pad: u32,
    /// The process's command (the exiting thread's own name for a thread exit).
    pub comm: [u8; TASK_COMM_LEN],
    /// The parent's command at the exit: a runtime's process (containerd-shim,
    /// runc's exec bootstrap) for a command the runtime exec'd into a
    /// container (exec probes, hooks). Read in the kernel: the bootstrap is
    /// gone by the time userspace could look.
    pub parent_comm: [u8; TASK_COMM_LEN],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] integers and byte arrays, no padding holes
    // that matter (explicit _pad), valid for any bit pattern.
    unsafe impl aya::Pod for super::ExitOffsets {}
    unsafe impl aya::Pod for super::ExitEvent {}
}
