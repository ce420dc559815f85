//! Which hook types this kernel accepts, found by loading (and attaching)
//! tiny do-nothing programs, never by reading the kernel version: distribution
//! kernels backport features, and configurations (trampolines, kprobes, the
//! LSM list) differ between kernels of the same version.

use std::fmt;

use aya::programs::{BtfTracePoint, FEntry, KProbe, Lsm, RawTracePoint, TracePoint};
use serde::Serialize;

use super::{ProbeError, error_chain, program};
use crate::kernel::{bpf_sys, tracefs};

/// A way of hooking a program into the kernel, as `doctor` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Tracepoint,
    RawTp,
    TpBtf,
    Fentry,
    Kprobe,
    Lsm,
    NetfilterLink,
}

impl Hook {
    pub const ALL: [Hook; 7] = [
        Hook::Tracepoint,
        Hook::RawTp,
        Hook::TpBtf,
        Hook::Fentry,
        Hook::Kprobe,
        Hook::Lsm,
        Hook::NetfilterLink,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hook::Tracepoint => "tracepoint",
            Hook::RawTp => "raw_tp",
            Hook::TpBtf => "tp_btf",
            Hook::Fentry => "fentry",
            Hook::Kprobe => "kprobe",
            Hook::Lsm => "lsm",
            Hook::NetfilterLink => "netfilter_link",
        }
    }

    pub fn from_name(name: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| h.name() == name)
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One hook type tried on this kernel: Ok, or the kernel's reason for refusing it.
#[derive(Clone, Debug)]
pub struct HookProbe {
    pub hook: Hook,
    pub result: Result<(), String>,
}

/// aya appends "Verifier output: " with the verifier's log, which is empty
/// when the kernel refused the program type outright: drop the empty label.
fn tidy(reason: &str) -> String {
    let r = reason.trim_end();
    r.strip_suffix("Verifier output:")
        .map(|s| s.trim_end().trim_end_matches('.').to_string())
        .unwrap_or_else(|| r.to_string())
}

/// Tries every hook type once. Each program is detached again when the
/// object is dropped at the end.
pub fn probe_hooks() -> Result<Vec<HookProbe>, ProbeError> {
    let btf = super::kernel_btf_for_aya();
    let mut ebpf = super::load_object_for_probing(btf.as_ref())?;
    let need_btf = || "the kernel's BTF could not be read".to_string();
    let mut out = vec![];
    for hook in Hook::ALL {
        let result: Result<(), String> = match hook {
            Hook::Tracepoint => (|| {
                if tracefs::mounted().is_none() {
                    return Err("tracefs is not mounted".into());
                }
                let p: &mut TracePoint = program(&mut ebpf, "doctor_tracepoint")?;
                p.load().map_err(|e| error_chain(&e))?;
                p.attach("sched", "sched_process_exit")
                    .map_err(|e| error_chain(&e))
                    .map(drop)
            })(),
            Hook::RawTp => (|| {
                let p: &mut RawTracePoint = program(&mut ebpf, "doctor_raw_tp")?;
                p.load().map_err(|e| error_chain(&e))?;
                p.attach("sched_process_exit")
                    .map_err(|e| error_chain(&e))
                    .map(drop)
            })(),
            Hook::TpBtf => (|| {
                let btf = btf.as_ref().ok_or_else(need_btf)?;
                let p: &mut BtfTracePoint = program(&mut ebpf, "doctor_tp_btf")?;
                p.load("sched_process_exit", btf)
                    .map_err(|e| error_chain(&e))?;
                p.attach().map_err(|e| error_chain(&e)).map(drop)
            })(),
            Hook::Fentry => (|| {
                let btf = btf.as_ref().ok_or_else(need_btf)?;
                let p: &mut FEntry = program(&mut ebpf, "doctor_fentry")?;
                p.load("do_exit", btf).map_err(|e| error_chain(&e))?;
                p.attach().map_err(|e| error_chain(&e)).map(drop)
            })(),
            Hook::Kprobe => (|| {
                let p: &mut KProbe = program(&mut ebpf, "doctor_kprobe")?;
                p.load().map_err(|e| error_chain(&e))?;
                p.attach("do_exit", 0)
                    .map_err(|e| error_chain(&e))
                    .map(drop)
            })(),
            Hook::Lsm => (|| {
                let btf = btf.as_ref().ok_or_else(need_btf)?;
                let p: &mut Lsm = program(&mut ebpf, "doctor_lsm")?;
                p.load("bprm_committed_creds", btf)
                    .map_err(|e| error_chain(&e))?;
                p.attach().map_err(|e| error_chain(&e)).map(drop)
            })(),
            Hook::NetfilterLink => bpf_sys::probe_netfilter_link().map_err(|e| e.to_string()),
        };
        out.push(HookProbe {
            hook,
            result: result.map_err(|e| tidy(&e)),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_verifier_logs_are_dropped() {
        assert_eq!(
            tidy(
                "the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1). Verifier output: "
            ),
            "the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1)"
        );
        assert_eq!(
            tidy("Verifier output: R1 invalid"),
            "Verifier output: R1 invalid"
        );
        for h in Hook::ALL {
            assert_eq!(Hook::from_name(h.name()), Some(h));
        }
    }
}
