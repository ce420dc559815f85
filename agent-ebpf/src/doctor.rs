//! Tiny programs that `podscope doctor` loads (and attaches) to find out which
//! hook types this kernel really accepts. They do nothing when they fire.

use aya_ebpf::{
    macros::{btf_tracepoint, fentry, kprobe, lsm, raw_tracepoint, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, LsmContext, ProbeContext, RawTracePointContext,
        TracePointContext,
    },
};

#[tracepoint]
pub fn doctor_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn doctor_raw_tp(_ctx: RawTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn doctor_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[fentry(function = "do_exit")]
pub fn doctor_fentry(_ctx: FEntryContext) -> i32 {
    0
}

#[kprobe]
pub fn doctor_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

/// Allows everything: an LSM program's return value is its verdict, and 0 is "no objection".
#[lsm(hook = "bprm_committed_creds")]
pub fn doctor_lsm(_ctx: LsmContext) -> i32 {
    0
}
