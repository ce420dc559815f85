//! Signals that can end a process, from `signal:signal_generate`: sender,
//! target, signal, how it was sent and what the kernel did with it.

use std::{borrow::Cow, os::fd::RawFd, time::SystemTime};

use agent_common::signals::{
    HANDLER_CUSTOM, HANDLER_DEFAULT, HANDLER_IGNORE, SIGNAL_FLAG_GROUP, SIGNAL_FLAG_NOINFO,
    SIGNAL_FLAG_PARTIAL, SIGNAL_FLAG_PRIV, SIGNAL_FLAG_SENDER_EXITING, SignalEvent, SignalOffsets,
};
use aya::{Ebpf, EbpfLoader};
use serde::Serialize;

use super::{AttachType, Attachment, FamilyMaps, FamilyStats, Pass, ProbeError, attach_family};
use crate::{
    kernel::{
        btf::{Btf, BtfError},
        clock::BootClock,
    },
    metadata::PodIdentity,
};

pub const FAMILY: &str = crate::families::Kernel::Signals.name();
const HOOK: &str = "signal:signal_generate";
const EVENTS_MAP: &str = "SIGNAL_EVENTS";
const STATS_MAP: &str = "SIGNAL_STATS";

/// raw_tp, then tp_btf: both hand the program the target task, at the same
/// cost; raw_tp needs no BTF parse at attach (see `probes::AttachBtf`). The plain
/// tracepoint's record has only the target's pid and comm, not its cgroup,
/// so it cannot say which container was signalled.
pub const PREFERENCE: [AttachType; 2] = [AttachType::RawTp, AttachType::TpBtf];

/// `_NSIG` on Linux: `sighand_struct.action` has one entry per signal.
const NSIG: u32 = 64;

pub fn resolve_offsets(btf: &Btf) -> Result<SignalOffsets, BtfError> {
    let task = |m| btf.offset_of("task_struct", m);
    let action = btf.member("sighand_struct", "action")?;
    let (pid, tgid) = (task("pid")?, task("tgid")?);
    // The probe copies both with one 8-byte read (adjacent since Linux 2.6).
    if tgid != pid + 4 {
        return Err(BtfError::Layout(format!(
            "task_struct.tgid is at byte {tgid}, not right after pid at {pid}"
        )));
    }
    Ok(SignalOffsets {
        task_pid: pid,
        task_comm: task("comm")?,
        task_flags: task("flags")?,
        task_cgroups: task("cgroups")?,
        css_set_dfl_cgrp: btf.offset_of("css_set", "dfl_cgrp")?,
        cgroup_kn: btf.offset_of("cgroup", "kn")?,
        kn_id: btf.offset_of("kernfs_node", "id")?,
        task_sighand: task("sighand")?,
        sighand_action: action.offset,
        k_sigaction_size: action.size / NSIG,
        k_sigaction_handler: btf.offset_of("k_sigaction", "sa")?
            + btf.offset_of("sigaction", "sa_handler")?,
        siginfo_code: btf.offset_of("kernel_siginfo", "si_code")?,
    })
}

pub(super) fn configure<'a>(
    loader: &mut EbpfLoader<'a>,
    offsets: &'a SignalOffsets,
    opts: &super::LoadOptions,
) {
    // As large as the exits ring: a kill loop produces signals as fast as
    // a fork loop produces exits.
    loader
        .override_global("SIGNAL_OFFSETS", offsets, true)
        .map_max_entries(EVENTS_MAP, opts.ring_buffer_bytes);
}

/// One side of a signal: a process and who it belongs to.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Party {
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    #[serde(flatten)]
    pub pod: PodIdentity,
}

/// How the signal was raised, from its siginfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// kill(2) / a user process (SI_USER, or no siginfo).
    Kill,
    /// tgkill(2) / tkill(2), e.g. abort() or raise().
    Tkill,
    /// sigqueue(3) and other negative si_codes from userspace.
    Queue,
    /// The kernel on its own behalf (OOM killer, pid namespace teardown, rlimits).
    Kernel,
    /// A hardware fault in the target itself (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP).
    Fault,
}

/// What the kernel did with it (the tracepoint's `result`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    Delivered,
    /// Dropped: ignored by the target, or SIG_DFL for a namespace's init.
    Ignored,
    AlreadyPending,
    OverflowFail,
    LoseInfo,
    Unknown,
}

/// The target's disposition for the signal when it was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Handler {
    Default,
    Ignore,
    /// The process installed its own handler.
    Custom,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Signal {
    #[serde(serialize_with = "crate::events::rfc3339")]
    pub ts: SystemTime,
    /// Boot-time ns, to order and measure intervals exactly.
    #[serde(skip)]
    pub ts_boot_ns: u64,
    pub signal: Cow<'static, str>,
    pub signo: u32,
    pub si_code: i32,
    pub origin: Origin,
    pub delivery: Delivery,
    pub handler: Handler,
    /// Sent to the whole process (kill), not one thread (tgkill).
    pub group: bool,
    /// The sender was itself exiting (e.g. a namespace's init tearing the namespace down).
    pub sender_exiting: bool,
    pub sender: Party,
    /// The process signalled; also who the event belongs to.
    pub target: Party,
    pub partial: bool,
}

impl Signal {
    pub fn decode(raw: &SignalEvent, clock: &BootClock) -> Signal {
        let sig = u32::from(raw.sig);
        let origin = if raw.flags & SIGNAL_FLAG_PRIV != 0 {
            Origin::Kernel
        } else if raw.flags & SIGNAL_FLAG_NOINFO != 0 {
            Origin::Kill
        } else {
            match raw.code {
                0 => Origin::Kill,
                -6 => Origin::Tkill,
                c if c < 0 => Origin::Queue,
                0x80 => Origin::Kernel,
                // Positive codes are the kernel's own (faults, SIGCHLD, SIGPOLL …);
                // for the fault signals they mean the target faulted.
                _ if matches!(sig, 4 | 5 | 7 | 8 | 11) => Origin::Fault,
                _ => Origin::Kernel,
            }
        };
        Signal {
            ts: clock.to_system_time(raw.ts_boot_ns),
            ts_boot_ns: raw.ts_boot_ns,
            signal: crate::signals::name(sig),
            signo: sig,
            si_code: raw.code,
            origin,
            delivery: match raw.result {
                0 => Delivery::Delivered,
                1 => Delivery::Ignored,
                2 => Delivery::AlreadyPending,
                3 => Delivery::OverflowFail,
                4 => Delivery::LoseInfo,
                _ => Delivery::Unknown,
            },
            handler: match raw.handler {
                HANDLER_DEFAULT => Handler::Default,
                HANDLER_IGNORE => Handler::Ignore,
                HANDLER_CUSTOM => Handler::Custom,
                _ => Handler::Unknown,
            },
            group: raw.flags & SIGNAL_FLAG_GROUP != 0,
            sender_exiting: raw.flags & SIGNAL_FLAG_SENDER_EXITING != 0,
            sender: Party {
                pid: raw.sender_pid,
                tgid: raw.sender_tgid,
                comm: super::comm_str(&raw.sender_comm),
                cgroup_id: raw.sender_cgroup_id,
                pod: PodIdentity::default(),
            },
            target: Party {
                pid: raw.target_pid,
                tgid: raw.target_tgid,
                comm: super::comm_str(&raw.target_comm),
                cgroup_id: raw.target_cgroup_id,
                pod: PodIdentity::default(),
            },
            partial: raw.flags & SIGNAL_FLAG_PARTIAL != 0,
        }
    }
}

pub struct SignalProbe {
    maps: FamilyMaps,
    clock: BootClock,
    pub attachment: Attachment,
}

impl SignalProbe {
    pub fn attach(ebpf: &mut Ebpf, btf: &super::AttachBtf) -> Result<SignalProbe, ProbeError> {
        let (maps, attachment) = attach_family(
            ebpf,
            (FAMILY, HOOK),
            (EVENTS_MAP, STATS_MAP),
            PREFERENCE,
            |ebpf, kind| attach_one(ebpf, btf, kind),
        )?;
        Ok(SignalProbe {
            maps,
            clock: BootClock::new(),
            attachment,
        })
    }

    /// Decodes every event waiting in the ring buffer; returns how many.
    pub fn drain(&mut self, f: impl FnMut(Signal)) -> usize {
        self.drain_within(&mut Pass::all(), f)
    }

    /// Decodes the events waiting, within one drain pass's bounds.
    pub fn drain_within(&mut self, pass: &mut Pass, mut f: impl FnMut(Signal)) -> usize {
        let clock = &self.clock;
        self.maps
            .drain_ordered(pass, |raw: SignalEvent| f(Signal::decode(&raw, clock)))
    }

    pub fn stats(&self) -> FamilyStats {
        self.maps.stats()
    }

    pub fn ring_fd(&self) -> RawFd {
        self.maps.ring_fd()
    }
}

fn attach_one(ebpf: &mut Ebpf, btf: &super::AttachBtf, kind: AttachType) -> Result<(), String> {
    super::attach_tracepoint(
        ebpf,
        btf,
        kind,
        ("signal", "a signal"),
        ("signal", "signal_generate"),
    )
}

impl super::Stamped for SignalEvent {
    fn stamp_ns(&self) -> u64 {
        self.ts_boot_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fixtures;

    #[test]
    fn resolves_offsets_on_the_recorded_6_1_kernel() {
        let o = resolve_offsets(&fixtures::debian_6_1_btf()).unwrap();
        // struct k_sigaction is 32 bytes on x86_64 (handler, flags, restorer, mask).
        assert_eq!(o.k_sigaction_size, 32);
        assert_eq!(o.k_sigaction_handler, 0);
        // si_signo, si_errno, si_code.
        assert_eq!(o.siginfo_code, 8);
    }

    #[test]
    fn origins_from_siginfo() {
        let raw = |code: i32, sig: u8, flags: u8| SignalEvent {
            ts_boot_ns: 1,
            sender_cgroup_id: 0,
            target_cgroup_id: 0,
            sender_pid: 1,
            sender_tgid: 1,
            target_pid: 2,
            target_tgid: 2,
            sig,
            code,
            result: 0,
            handler: HANDLER_DEFAULT,
            flags,
            sender_comm: [0; 16],
            target_comm: [0; 16],
        };
        let c = BootClock::new();
        assert_eq!(Signal::decode(&raw(0, 15, 0), &c).origin, Origin::Kill);
        assert_eq!(Signal::decode(&raw(-6, 6, 0), &c).origin, Origin::Tkill);
        assert_eq!(Signal::decode(&raw(1, 11, 0), &c).origin, Origin::Fault);
        assert_eq!(
            Signal::decode(&raw(0x80, 9, SIGNAL_FLAG_PRIV), &c).origin,
            Origin::Kernel
        );
        assert_eq!(Signal::decode(&raw(0, 9, 0), &c).signal, "SIGKILL");
    }
}
