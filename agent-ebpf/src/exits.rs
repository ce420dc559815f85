//! Process and thread exits: `sched:sched_process_exit`.
//!
//! The tracepoint fires in `do_exit()` for the exiting task itself, after
//! `signal->live` was decremented and `exit_code` stored, so everything is
//! read from the current task. Four entry points share one body: raw_tp and
//! tp_btf (no tracepoint record is filled) read `current` and what it points
//! to with plain loads from the BTF-typed task (5.11 and the kernel's own
//! BTF); a second raw_tp program reads with `bpf_probe_read_kernel` where
//! that is refused; the plain tracepoint last (needs tracefs, and the kernel
//! fills its record first). Userspace picks by probing.
//!
//! With plain loads a fault reads as 0 and cannot be told apart: the
//! partial flag is only ever set by the probe-read programs.

use agent_common::{
    OFFSET_ABSENT, TASK_COMM_LEN,
    exits::{EXIT_FLAG_GROUP_DEAD, EXIT_FLAG_PARTIAL, ExitEvent, ExitOffsets, SIGNAL_GROUP_EXIT},
    stats::{STAT_EMITTED, STAT_FILTERED, STAT_HITS, STAT_LOST, STAT_READ_ERRORS, STAT_SLOTS},
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_ktime_get_boot_ns,
        generated::{bpf_get_current_comm, bpf_get_current_task_btf},
    },
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};

use crate::{
    kmem::{self, Access, Probed, Typed},
    ringbuf,
    stats::bump,
};

/// Set by userspace at load time from the kernel's BTF.
#[unsafe(no_mangle)]
static EXIT_OFFSETS: ExitOffsets = ExitOffsets {
    task_real_parent: 0,
    task_group_leader: 0,
    task_tgid: 0,
    task_exit_code: 0,
    task_start_boottime: 0,
    task_comm: 0,
    task_signal: 0,
    signal_live: 0,
    signal_flags: 0,
    signal_group_exec_task: OFFSET_ABSENT,
};

/// Resized by userspace (`--ring-buffer-size`).
#[map]
static EXIT_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static EXIT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

#[btf_tracepoint(function = "sched_process_exit")]
pub fn exit_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    // SAFETY: returns `current`, BTF-typed.
    on_exit::<Typed>(unsafe { bpf_get_current_task_btf() } as *const u8);
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn exit_raw_tp(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: as above; raw_tp programs get the BTF-typed `current` too.
    on_exit::<Typed>(unsafe { bpf_get_current_task_btf() } as *const u8);
    0
}

/// The raw_tp hook where the one above is refused (no kernel BTF, before
/// 5.11): probe reads, as the plain tracepoint.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn exit_raw_tp_probed(_ctx: RawTracePointContext) -> i32 {
    on_exit::<Probed>(unsafe { bpf_get_current_task() } as *const u8);
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn exit_tracepoint(_ctx: TracePointContext) -> u32 {
    on_exit::<Probed>(unsafe { bpf_get_current_task() } as *const u8);
    0
}

/// One body for the three hooks; `A` says how `task` (`current`) and the
/// structures it points to are read: plain loads where the hook hands out
/// BTF-typed pointers (seven helper calls fewer per exit), the probe-read
/// helper in the plain tracepoint.
#[inline(always)]
fn on_exit<A: Access>(task: *const u8) {
    bump(&EXIT_STATS, STAT_HITS);
    // SAFETY: a volatile read keeps the compiler from folding the load-time value.
    let off = unsafe { core::ptr::read_volatile(&EXIT_OFFSETS) };
    let mut flags = 0u32;

    let signal = A::read::<*const u8>(task, off.task_signal);
    let (live, sig_flags, exec_task) = match signal {
        Ok(signal) => (
            A::read::<i32>(signal, off.signal_live),
            A::read::<u32>(signal, off.signal_flags).unwrap_or(0),
            if off.signal_group_exec_task == OFFSET_ABSENT {
                0
            } else {
                A::read::<u64>(signal, off.signal_group_exec_task).unwrap_or(0)
            },
        ),
        Err(e) => (Err(e), 0, 0),
    };
    let group_dead = match live {
        Ok(live) => live == 0,
        Err(_) => {
            flags |= EXIT_FLAG_PARTIAL;
            // Unknown: report it rather than drop it.
            true
        }
    };
    if group_dead {
        flags |= EXIT_FLAG_GROUP_DEAD;
    } else if sig_flags & SIGNAL_GROUP_EXIT != 0 || exec_task != 0 {
        // One of the other threads of a process that exits (or execs) as a
        // whole: the process's own event comes with its last thread.
        bump(&EXIT_STATS, STAT_FILTERED);
        return;
    }

    let Some(mut entry) = EXIT_EVENTS.reserve::<ExitEvent>(0) else {
        bump(&EXIT_STATS, STAT_LOST);
        return;
    };
    let e = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    // The process as a whole is described by its leader (name, start time);
    // a lone thread by itself.
    let subject = if group_dead {
        A::read::<*const u8>(task, off.task_group_leader).unwrap_or(task)
    } else {
        task
    };
    let start = A::read::<u64>(subject, off.task_start_boottime);
    let status = A::read::<u32>(task, off.task_exit_code);
    // A null parent reads as a fault (or 0): an empty name only loses the
    // runtime-exec hint.
    let parent = A::read::<*const u8>(task, off.task_real_parent).unwrap_or(core::ptr::null());
    let ppid = A::read::<u32>(parent, off.task_tgid);
    if start.is_err() || status.is_err() || ppid.is_err() {
        flags |= EXIT_FLAG_PARTIAL;
    }
    if flags & EXIT_FLAG_PARTIAL != 0 {
        bump(&EXIT_STATS, STAT_READ_ERRORS);
    }
    // SAFETY: `e` is the reserved entry, ours until submit; every field is
    // written below, and the names' reads land in its fields directly (an
    // event built on the stack was zeroed and copied byte by byte: a third
    // of the signal probe's instructions, see signals.rs).
    unsafe {
        if subject == task {
            // Zero-filled by the kernel if it fails.
            bpf_get_current_comm((&raw mut (*e).comm).cast(), TASK_COMM_LEN as u32);
        } else if !kmem::read_into(
            subject,
            off.task_comm,
            (&raw mut (*e).comm).cast::<[u8; TASK_COMM_LEN]>(),
        ) {
            bpf_get_current_comm((&raw mut (*e).comm).cast(), TASK_COMM_LEN as u32);
        }
        kmem::read_into(
            parent,
            off.task_comm,
            (&raw mut (*e).parent_comm).cast::<[u8; TASK_COMM_LEN]>(),
        );
        (&raw mut (*e).start_boot_ns).write(start.unwrap_or(0));
        (&raw mut (*e).wait_status).write(status.unwrap_or(0));
        (&raw mut (*e).ppid).write(ppid.unwrap_or(0));
        (&raw mut (*e).ts_boot_ns).write(bpf_ktime_get_boot_ns());
        (&raw mut (*e).cgroup_id).write(bpf_get_current_cgroup_id());
        (&raw mut (*e).pid).write(pid_tgid as u32);
        (&raw mut (*e).tgid).write((pid_tgid >> 32) as u32);
        (&raw mut (*e).flags).write(flags);
        (&raw mut (*e)._pad).write(0);
    }
    ringbuf::submit(&EXIT_EVENTS, entry);
    bump(&EXIT_STATS, STAT_EMITTED);
}
