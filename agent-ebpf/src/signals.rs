//! Signals: `signal:signal_generate`, filtered in the kernel to signals whose
//! default action ends a process (SIGCHLD, SIGCONT, stop signals … are
//! counted as filtered and never leave the kernel).
//!
//! The tracepoint runs in the sender's context (`current`), with the target
//! task as an argument: `(int sig, struct kernel_siginfo *info,
//! struct task_struct *task, int group, int result)`. tp_btf first, raw_tp
//! where tp_btf is refused; the plain tracepoint's record has no target task
//! (no target cgroup), so it is not offered.

use agent_common::{
    TASK_COMM_LEN,
    signals::{
        HANDLER_CUSTOM, HANDLER_DEFAULT, HANDLER_IGNORE, HANDLER_UNKNOWN, PF_EXITING,
        SIGNAL_FLAG_GROUP, SIGNAL_FLAG_NOINFO, SIGNAL_FLAG_PARTIAL, SIGNAL_FLAG_PRIV,
        SIGNAL_FLAG_SENDER_EXITING, SignalEvent, SignalOffsets, fatal_by_default,
    },
    stats::{STAT_EMITTED, STAT_FILTERED, STAT_LOST, STAT_READ_ERRORS, STAT_SLOTS},
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns,
        generated::{bpf_get_current_comm, bpf_get_current_task_btf},
    },
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};

use crate::{kmem, ringbuf, stats::bump};

#[unsafe(no_mangle)]
static SIGNAL_OFFSETS: SignalOffsets = SignalOffsets {
    task_pid: 0,
    task_comm: 0,
    task_flags: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kn_id: 0,
    task_sighand: 0,
    sighand_action: 0,
    k_sigaction_size: 0,
    k_sigaction_handler: 0,
    siginfo_code: 0,
};

#[map]
static SIGNAL_EVENTS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

#[map]
static SIGNAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

#[btf_tracepoint(function = "signal_generate")]
pub fn signal_tp_btf(ctx: BtfTracePointContext) -> i32 {
    on_signal(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3), ctx.arg(4));
    0
}

#[raw_tracepoint(tracepoint = "signal_generate")]
pub fn signal_raw_tp(ctx: RawTracePointContext) -> i32 {
    on_signal(ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3), ctx.arg(4));
    0
}

/// `SEND_SIG_NOINFO` and `SEND_SIG_PRIV` are the pointers 0 and 1.
const SEND_SIG_PRIV: usize = 1;

/// Every signal on the node passes here (a SIGCHLD per exit), so the
/// filtered path is a compare and one counter; `STAT_HITS` is not bumped:
/// every path ends in exactly one of emitted, lost or filtered, and
/// userspace adds them up. An emitted signal is written field by field into
/// its ring buffer entry, the kernel reads landing there directly, with the
/// fewest reads the record allows (pid and tgid in one).
#[inline(always)]
fn on_signal(sig: u64, info: *const u8, task: *const u8, group: u64, result: u64) {
    let sig = sig as u32;
    if !fatal_by_default(sig) {
        bump(&SIGNAL_STATS, STAT_FILTERED);
        return;
    }
    // SAFETY: a volatile read keeps the load-time value from being folded.
    let off = unsafe { core::ptr::read_volatile(&SIGNAL_OFFSETS) };
    // Stamped before the reservation: whatever is reserved after this
    // record (and any exit it causes) is stamped after it. Userspace's
    // ordered drain relies on that (an exit is never read before the
    // signal that caused it: probes::Pass).
    // SAFETY: reads the boot clock; no memory is touched.
    let stamp = unsafe { bpf_ktime_get_boot_ns() };
    let Some(mut entry) = SIGNAL_EVENTS.reserve::<SignalEvent>(0) else {
        bump(&SIGNAL_STATS, STAT_LOST);
        return;
    };
    let e = entry.as_mut_ptr();
    let mut flags = 0u8;
    if group as i32 != 0 {
        flags |= SIGNAL_FLAG_GROUP;
    }
    // SAFETY: `e` is the reserved entry, ours until submit; every field is
    // written below, the reads' destinations are its fields.
    unsafe {
        // Under tp_btf the verifier types `info` as a pointer that is never
        // NULL and drops this arm (measured on 6.18): a SEND_SIG_NOINFO
        // signal then takes the read below, which fails on NULL and leaves
        // code 0, decoded alike (a kill); raw_tp keeps the arm.
        match info as usize {
            0 => {
                flags |= SIGNAL_FLAG_NOINFO;
                (&raw mut (*e).code).write(0);
            }
            SEND_SIG_PRIV => {
                flags |= SIGNAL_FLAG_PRIV;
                // SI_KERNEL, as the kernel itself fills in for SEND_SIG_PRIV.
                (&raw mut (*e).code).write(0x80);
            }
            _ => {
                kmem::read_into(info, off.siginfo_code, &raw mut (*e).code);
            }
        }
        // The sender is `current`, which the kernel hands out BTF-typed
        // (in raw_tp and tp_btf programs alike): its flags are a plain
        // load, no helper call.
        let current = bpf_get_current_task_btf() as *const u8;
        let sender_flags = current
            .add(off.task_flags as usize)
            .cast::<u32>()
            .read_volatile();
        if sender_flags & PF_EXITING != 0 {
            flags |= SIGNAL_FLAG_SENDER_EXITING;
        }
        // pid and tgid, adjacent in task_struct and in the event.
        let ids_ok = kmem::read_into(task, off.task_pid, (&raw mut (*e).target_pid).cast::<u64>());
        let target_cgroup = kmem::read_ptr(task, off.task_cgroups)
            .and_then(|cset| kmem::read_ptr(cset, off.css_set_dfl_cgrp))
            .and_then(|cgrp| kmem::read_ptr(cgrp, off.cgroup_kn))
            .and_then(|kn| kmem::read::<u64>(kn, off.kn_id));
        let comm_ok = kmem::read_into(
            task,
            off.task_comm,
            (&raw mut (*e).target_comm).cast::<[u8; TASK_COMM_LEN]>(),
        );
        if !ids_ok || target_cgroup.is_err() || !comm_ok {
            flags |= SIGNAL_FLAG_PARTIAL;
            bump(&SIGNAL_STATS, STAT_READ_ERRORS);
        }
        let pid_tgid = bpf_get_current_pid_tgid();
        (&raw mut (*e).ts_boot_ns).write(stamp);
        (&raw mut (*e).sender_cgroup_id).write(bpf_get_current_cgroup_id());
        (&raw mut (*e).target_cgroup_id).write(target_cgroup.unwrap_or(0));
        (&raw mut (*e).sender_pid).write(pid_tgid as u32);
        (&raw mut (*e).sender_tgid).write((pid_tgid >> 32) as u32);
        // Both fit a byte: fatal_by_default passed 1..=64 only; the
        // tracepoint's results are 0..=4.
        (&raw mut (*e).sig).write(sig as u8);
        (&raw mut (*e).result).write(result as u8);
        (&raw mut (*e).handler).write(handler_of(task, sig, &off));
        (&raw mut (*e).flags).write(flags);
        // Zero-filled by the kernel if it fails.
        bpf_get_current_comm((&raw mut (*e).sender_comm).cast(), TASK_COMM_LEN as u32);
    }
    // Signals that end processes are rare next to the work they end, and
    // a stop's SIGTERM → SIGKILL timeline wants them promptly: batched like
    // exits all the same, so a kill storm cannot become a wakeup storm.
    ringbuf::submit(&SIGNAL_EVENTS, entry);
    bump(&SIGNAL_STATS, STAT_EMITTED);
}

/// The target's `sa_handler` for `sig`: default, ignore or its own.
#[inline(always)]
fn handler_of(task: *const u8, sig: u32, off: &SignalOffsets) -> u8 {
    let Ok(sighand) = kmem::read_ptr(task, off.task_sighand) else {
        return HANDLER_UNKNOWN;
    };
    // sig is 1..=64 here; the mask keeps the verifier sure of the bound.
    let index = (sig.wrapping_sub(1) & 63) as u64;
    let at = off.sighand_action as u64
        + index * off.k_sigaction_size as u64
        + off.k_sigaction_handler as u64;
    match kmem::read::<usize>(sighand, at as u32) {
        Ok(0) => HANDLER_DEFAULT,
        Ok(1) => HANDLER_IGNORE,
        Ok(_) => HANDLER_CUSTOM,
        Err(_) => HANDLER_UNKNOWN,
    }
}
