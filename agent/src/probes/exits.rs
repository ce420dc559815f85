//! Exit tracing: every process exit and every lone thread exit on the node,
//! from `sched:sched_process_exit`, through a ring buffer.

use std::{
    borrow::Cow,
    os::fd::RawFd,
    time::{Duration, SystemTime},
};

use agent_common::{
    OFFSET_ABSENT,
    exits::{EXIT_FLAG_GROUP_DEAD, EXIT_FLAG_PARTIAL, ExitEvent, ExitOffsets},
};
use aya::{Ebpf, EbpfLoader};
use serde::Serialize;

use super::{
    AttachType, Attachment, FamilyMaps, FamilyStats, KernelOffsets, LoadOptions, Pass, ProbeError,
    attach_family,
};
use crate::{
    kernel::{
        btf::{Btf, BtfError},
        clock::BootClock,
    },
    metadata::PodIdentity,
};

pub const FAMILY: &str = crate::families::Kernel::Exits.name();
const HOOK: &str = "sched:sched_process_exit";
const EVENTS_MAP: &str = "EXIT_EVENTS";
const STATS_MAP: &str = "EXIT_STATS";
const OFFSETS_GLOBAL: &str = "EXIT_OFFSETS";

/// The exit hooks, best first. All three fire at the same point of
/// `do_exit()` with the same body; they differ in cost and in what the
/// kernel must allow: raw_tp (no tracepoint record is filled; plain loads
/// from the BTF-typed current task since 5.11, probe reads since 4.17),
/// tp_btf (the same cost, but aya must parse the kernel's BTF to load it,
/// which raw_tp spares start-up memory), the plain tracepoint (needs
/// tracefs; the kernel fills its record first). fentry on `do_exit` is not among them: it runs before
/// `signal->live` is decremented and `exit_code` stored, so it could not
/// tell a thread's exit from its process's.
pub const PREFERENCE: [AttachType; 3] =
    [AttachType::RawTp, AttachType::TpBtf, AttachType::Tracepoint];

/// Where the exit probe's kernel fields are on this kernel.
pub fn resolve_offsets(btf: &Btf) -> Result<ExitOffsets, BtfError> {
    let task = |m| btf.offset_of("task_struct", m);
    let signal = |m| btf.offset_of("signal_struct", m);
    Ok(ExitOffsets {
        task_real_parent: task("real_parent")?,
        task_group_leader: task("group_leader")?,
        task_tgid: task("tgid")?,
        task_exit_code: task("exit_code")?,
        task_start_boottime: task("start_boottime")
            // Before 5.5 it was called real_start_time.
            .or_else(|_| task("real_start_time"))?,
        task_comm: task("comm")?,
        task_signal: task("signal")?,
        signal_live: signal("live")?,
        signal_flags: signal("flags")?,
        signal_group_exec_task: signal("group_exec_task").unwrap_or(OFFSET_ABSENT),
    })
}

pub(super) fn configure<'a>(
    loader: &mut EbpfLoader<'a>,
    offsets: &'a ExitOffsets,
    opts: &LoadOptions,
) {
    loader
        .override_global(OFFSETS_GLOBAL, offsets, true)
        .map_max_entries(EVENTS_MAP, opts.ring_buffer_bytes);
}

/// One exit, decoded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Exit {
    /// When it happened (RFC 3339 in JSON).
    #[serde(serialize_with = "crate::events::rfc3339")]
    pub ts: SystemTime,
    /// The same moment in ns since boot, to order it against other families' events.
    #[serde(skip)]
    pub ts_boot_ns: u64,
    /// The thread's id (equal to `tgid` for a process's main thread).
    pub pid: u32,
    /// The process's id.
    pub tgid: u32,
    pub ppid: u32,
    pub comm: String,
    /// The parent's command at the exit (see `ExitEvent::parent_comm`).
    #[serde(skip)]
    pub parent_comm: String,
    /// The exit status, or None when a signal ended it.
    pub exit_code: Option<u8>,
    /// The terminating signal's name, or None on a normal exit.
    pub signal: Option<Cow<'static, str>>,
    pub core_dumped: bool,
    /// True when only a thread ended and its process lives on.
    pub thread: bool,
    /// Time from the start of the process (of the thread, for a thread exit) to its exit.
    pub lifetime_ns: u64,
    /// cgroup v2 id of the exiting task.
    pub cgroup_id: u64,
    /// A kernel read failed: some fields may be zero. Only the probe-read
    /// hooks can tell (the plain tracepoint, raw_tp without BTF): where
    /// the exit program reads with plain loads, a fault reads as 0.
    pub partial: bool,
    /// Who it belongs to, filled in by attribution (`crate::metadata`).
    #[serde(flatten)]
    pub pod: PodIdentity,
}

impl Exit {
    pub fn decode(raw: &ExitEvent, clock: &BootClock) -> Exit {
        let (exit_code, signal, core_dumped) = decode_wait_status(raw.wait_status);
        Exit {
            ts: clock.to_system_time(raw.ts_boot_ns),
            ts_boot_ns: raw.ts_boot_ns,
            pid: raw.pid,
            tgid: raw.tgid,
            ppid: raw.ppid,
            comm: super::comm_str(&raw.comm),
            parent_comm: super::comm_str(&raw.parent_comm),
            exit_code,
            signal: signal.map(crate::signals::name),
            core_dumped,
            thread: raw.flags & EXIT_FLAG_GROUP_DEAD == 0,
            lifetime_ns: if raw.start_boot_ns == 0 {
                0
            } else {
                raw.ts_boot_ns.saturating_sub(raw.start_boot_ns)
            },
            cgroup_id: raw.cgroup_id,
            partial: raw.flags & EXIT_FLAG_PARTIAL != 0,
            pod: PodIdentity::default(),
        }
    }

    pub fn lifetime(&self) -> Duration {
        Duration::from_nanos(self.lifetime_ns)
    }
}

/// Splits a wait(2) status: (exit status, terminating signal, core dumped).
pub fn decode_wait_status(status: u32) -> (Option<u8>, Option<u32>, bool) {
    let sig = status & 0x7f;
    if sig == 0 {
        (Some(((status >> 8) & 0xff) as u8), None, false)
    } else {
        (None, Some(sig), status & 0x80 != 0)
    }
}

/// The attached exit probe and its ring buffer.
pub struct ExitProbe {
    maps: FamilyMaps,
    clock: BootClock,
    pub attachment: Attachment,
}

impl ExitProbe {
    /// Attaches the best hook this kernel allows, trying [`PREFERENCE`] in
    /// order and keeping each refusal's reason. `only` forces one (tests).
    pub fn attach(
        ebpf: &mut Ebpf,
        btf: &super::AttachBtf,
        only: Option<AttachType>,
    ) -> Result<ExitProbe, ProbeError> {
        let kinds = PREFERENCE
            .into_iter()
            .filter(|k| only.is_none_or(|o| o == *k));
        let (maps, attachment) = attach_family(
            ebpf,
            (FAMILY, HOOK),
            (EVENTS_MAP, STATS_MAP),
            kinds,
            |ebpf, kind| attach_one(ebpf, btf, kind),
        )?;
        Ok(ExitProbe {
            maps,
            clock: BootClock::new(),
            attachment,
        })
    }

    /// Attaches the raw_tp program that reads with `bpf_probe_read_kernel`
    /// only: what [`ExitProbe::attach`] falls back to where the typed one is
    /// refused (a kernel without its own BTF, before 5.11). For tests, which
    /// cannot otherwise reach it on a kernel that accepts the typed one.
    pub fn attach_probed_raw_tp(ebpf: &mut Ebpf) -> Result<ExitProbe, ProbeError> {
        let (maps, attachment) = attach_family(
            ebpf,
            (FAMILY, HOOK),
            (EVENTS_MAP, STATS_MAP),
            [AttachType::RawTp],
            |ebpf, _| attach_raw_tp_probed(ebpf),
        )?;
        Ok(ExitProbe {
            maps,
            clock: BootClock::new(),
            attachment,
        })
    }

    /// Decodes every event waiting in the ring buffer; returns how many.
    pub fn drain(&mut self, f: impl FnMut(Exit)) -> usize {
        self.drain_within(&mut Pass::all(), f)
    }

    /// Decodes the events waiting, within one drain pass's bounds.
    pub fn drain_within(&mut self, pass: &mut Pass, mut f: impl FnMut(Exit)) -> usize {
        let clock = &self.clock;
        self.maps
            .drain_ordered(pass, |raw: ExitEvent| f(Exit::decode(&raw, clock)))
    }

    pub fn stats(&self) -> FamilyStats {
        self.maps.stats()
    }

    /// The ring buffer's fd, readable when events wait (for epoll/AsyncFd).
    pub fn ring_fd(&self) -> RawFd {
        self.maps.ring_fd()
    }
}

/// Runs the exit family's hook selection exactly as the agent does, then
/// detaches: what `doctor` reports and the kernel tests check.
pub fn probe_selection(offsets: &KernelOffsets) -> Result<Attachment, ProbeError> {
    let mut ebpf = super::load_object(offsets, &LoadOptions::with_ring_buffer(4096))?;
    let btf = super::attach_btf();
    let probe = ExitProbe::attach(&mut ebpf, &btf, None)?;
    Ok(probe.attachment)
}

fn attach_one(ebpf: &mut Ebpf, btf: &super::AttachBtf, kind: AttachType) -> Result<(), String> {
    let typed = super::attach_tracepoint(
        ebpf,
        btf,
        kind,
        ("exit", "an exit"),
        ("sched", "sched_process_exit"),
    );
    match (kind, typed) {
        // The raw_tp program's plain loads need `bpf_get_current_task_btf`
        // (5.11) and the kernel's own BTF; the same hook with probe reads
        // needs neither (4.17), and is still cheaper than the tracepoint.
        (AttachType::RawTp, Err(typed)) => attach_raw_tp_probed(ebpf)
            .map_err(|probed| format!("{typed}; with probe reads: {probed}")),
        (_, r) => r,
    }
}

fn attach_raw_tp_probed(ebpf: &mut Ebpf) -> Result<(), String> {
    let prog: &mut aya::programs::RawTracePoint = super::program(ebpf, "exit_raw_tp_probed")?;
    prog.load().map_err(|e| super::error_chain(&e))?;
    prog.attach("sched_process_exit")
        .map_err(|e| super::error_chain(&e))?;
    Ok(())
}

impl super::Stamped for ExitEvent {
    fn stamp_ns(&self) -> u64 {
        self.ts_boot_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fixtures;

    #[test]
    fn wait_status_decodes_codes_signals_and_core_dumps() {
        assert_eq!(decode_wait_status(3 << 8), (Some(3), None, false));
        assert_eq!(decode_wait_status(0), (Some(0), None, false));
        assert_eq!(decode_wait_status(255 << 8), (Some(255), None, false));
        assert_eq!(decode_wait_status(9), (None, Some(9), false));
        assert_eq!(decode_wait_status(15), (None, Some(15), false));
        assert_eq!(decode_wait_status(11 | 0x80), (None, Some(11), true));
    }

    #[test]
    fn decodes_a_raw_event() {
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"sleep");
        let raw = ExitEvent {
            ts_boot_ns: 5_000_000_000,
            start_boot_ns: 2_000_000_000,
            cgroup_id: 42,
            pid: 101,
            tgid: 100,
            ppid: 1,
            wait_status: 9,
            flags: 0,
            _pad: 0,
            comm,
            parent_comm: [0u8; 16],
        };
        let e = Exit::decode(&raw, &BootClock::new());
        assert_eq!(e.comm, "sleep");
        assert_eq!(e.exit_code, None);
        assert_eq!(e.signal.as_deref(), Some("SIGKILL"));
        assert!(e.thread);
        assert_eq!(e.lifetime(), Duration::from_secs(3));
        let full = Exit::decode(
            &ExitEvent {
                flags: EXIT_FLAG_GROUP_DEAD,
                comm: [b'x'; 16],
                ..raw
            },
            &BootClock::new(),
        );
        assert!(!full.thread);
        assert_eq!(full.comm, "x".repeat(16));
    }

    #[test]
    fn resolves_offsets_on_the_recorded_6_1_kernel() {
        let o = resolve_offsets(&fixtures::debian_6_1_btf()).unwrap();
        // From pahole on the same BTF (agent/fixtures/pahole-6.1.0-47-cloud-amd64.txt).
        assert_eq!(
            o,
            ExitOffsets {
                task_real_parent: 2432,
                task_group_leader: 2480,
                task_tgid: 2420,
                task_exit_code: 2312,
                task_start_boottime: 2784,
                task_comm: 2976,
                task_signal: 3072,
                signal_live: 4,
                signal_flags: 116,
                signal_group_exec_task: 104,
            }
        );
    }

    #[test]
    fn resolves_offsets_on_the_running_kernel() {
        let Some(btf) =
            crate::kernel::btf::running_kernel_for_test("resolves_offsets_on_the_running_kernel")
        else {
            return;
        };
        let o = resolve_offsets(&btf).unwrap();
        assert!(
            o.task_exit_code > 0 && o.task_signal > o.task_exit_code,
            "{o:?}"
        );
        assert_ne!(o.signal_group_exec_task, OFFSET_ABSENT);
    }
}
