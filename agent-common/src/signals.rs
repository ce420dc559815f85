//! Signals sent to processes, from `signal:signal_generate`: who sent which
//! signal to whom, and what the kernel did with it. The raw material of
//! termination forensics (who killed this container, and how).

use crate::TASK_COMM_LEN;

/// Kernel offsets the signal probe reads, resolved from BTF by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignalOffsets {
    /// `task_struct.pid`, followed by `tgid` (checked when resolved): the
    /// probe copies both with one read.
    pub task_pid: u32,
    pub task_comm: u32,
    /// `task_struct.flags` (PF_EXITING).
    pub task_flags: u32,
    /// `task_struct.cgroups` (pointer to css_set).
    pub task_cgroups: u32,
    /// `css_set.dfl_cgrp`: the task's cgroup in the v2 hierarchy.
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    /// `task_struct.sighand` (pointer to sighand_struct).
    pub task_sighand: u32,
    /// `sighand_struct.action`: `struct k_sigaction[_NSIG]`.
    pub sighand_action: u32,
    /// `sizeof(struct k_sigaction)`.
    pub k_sigaction_size: u32,
    /// Offset of `sa.sa_handler` inside `struct k_sigaction`.
    pub k_sigaction_handler: u32,
    /// `kernel_siginfo.si_code`.
    pub siginfo_code: u32,
}

/// `PF_EXITING` from include/linux/sched.h (a `#define`, stable since 2.6).
pub const PF_EXITING: u32 = 0x0000_0004;

/// The sender (current task) is itself exiting, e.g. a namespace's init
/// killing what is left in its pid namespace.
pub const SIGNAL_FLAG_SENDER_EXITING: u8 = 1 << 0;
/// Sent to the whole thread group (kill(2)), not one thread (tgkill(2)).
pub const SIGNAL_FLAG_GROUP: u8 = 1 << 1;
/// `SEND_SIG_PRIV`: sent by the kernel on its own behalf (OOM killer,
/// pid namespace teardown, …), no siginfo.
pub const SIGNAL_FLAG_PRIV: u8 = 1 << 2;
/// `SEND_SIG_NOINFO`: from userspace without a siginfo (kill from the kernel's
/// perspective of a user).
pub const SIGNAL_FLAG_NOINFO: u8 = 1 << 3;
/// A kernel read failed; some fields are zero.
pub const SIGNAL_FLAG_PARTIAL: u8 = 1 << 4;

/// The target's disposition for the signal when it was sent.
pub const HANDLER_DEFAULT: u8 = 0;
pub const HANDLER_IGNORE: u8 = 1;
pub const HANDLER_CUSTOM: u8 = 2;
pub const HANDLER_UNKNOWN: u8 = 3;

/// Signals whose default action ends the process (terminate or core dump):
/// bit N set for signal N. Everything else (SIGCHLD, SIGCONT, SIGSTOP, …)
/// is filtered in the kernel; real-time signals (32–64) terminate by default.
pub const FATAL_BY_DEFAULT_1_31: u32 = {
    let mut m = 0u32;
    let mut s = 1;
    while s < 32 {
        // SIGCHLD 17, SIGCONT 18, SIGSTOP 19, SIGTSTP 20, SIGTTIN 21,
        // SIGTTOU 22, SIGURG 23, SIGWINCH 28 do not end a process.
        if !matches!(s, 17..=23 | 28) {
            m |= 1 << s;
        }
        s += 1;
    }
    m
};

/// Whether `sig`'s default action ends the process.
#[inline(always)]
pub const fn fatal_by_default(sig: u32) -> bool {
    if sig >= 32 {
        sig <= 64
    } else {
        FATAL_BY_DEFAULT_1_31 & (1 << sig) != 0
    }
}

/// One signal, as the kernel side writes it, field by field, straight into
/// the ring buffer: 80 bytes (88 with the ring's header), the small fields
/// as bytes, so that a ring holds more of them and a storm writes fewer
/// cache lines.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SignalEvent {
    pub ts_boot_ns: u64,
    pub sender_cgroup_id: u64,
    pub target_cgroup_id: u64,
    pub sender_pid: u32,
    pub sender_tgid: u32,
    /// With `target_tgid`, 8-byte aligned and in `task_struct`'s order
    /// (pid, tgid): one kernel read fills both.
    pub target_pid: u32,
    pub target_tgid: u32,
    /// `si_code` (SI_USER 0, SI_KERNEL 0x80, SI_TKILL -6, > 0 for faults).
    pub code: i32,
    /// 1 to 64.
    pub sig: u8,
    /// The tracepoint's `result`: 0 delivered, 1 ignored, 2 already pending,
    /// 3 overflow, 4 lost info.
    pub result: u8,
    /// `HANDLER_*`.
    pub handler: u8,
    /// `SIGNAL_FLAG_*`.
    pub flags: u8,
    pub sender_comm: [u8; TASK_COMM_LEN],
    pub target_comm: [u8; TASK_COMM_LEN],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain integers and bytes, valid for any bit pattern.
    unsafe impl aya::Pod for super::SignalOffsets {}
    unsafe impl aya::Pod for super::SignalEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_ids_are_one_aligned_u64() {
        assert_eq!(core::mem::offset_of!(SignalEvent, target_pid) % 8, 0);
        assert_eq!(
            core::mem::offset_of!(SignalEvent, target_tgid),
            core::mem::offset_of!(SignalEvent, target_pid) + 4
        );
        assert_eq!(size_of::<SignalEvent>(), 80);
    }

    #[test]
    fn fatal_default_signals() {
        for s in [1, 2, 3, 6, 9, 10, 11, 13, 14, 15, 24, 31, 34, 64] {
            assert!(fatal_by_default(s), "{s}");
        }
        for s in [0, 17, 18, 19, 20, 21, 22, 23, 28, 65] {
            assert!(!fatal_by_default(s), "{s}");
        }
    }
}
