//! CFS bandwidth throttling per container, from `sched:sched_switch`: one
//! event per completed throttle of a container's run queue on one CPU, with
//! its duration (see agent-ebpf's throttle.rs for how it is measured).

use std::{
    os::fd::RawFd,
    time::{Duration, SystemTime},
};

use agent_common::throttle::{THROTTLE_FLAG_ANCESTOR, ThrottleEvent, ThrottleOffsets};
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

pub const FAMILY: &str = crate::families::Kernel::Throttle.name();
const HOOK: &str = "sched:sched_switch";
const EVENTS_MAP: &str = "THROTTLE_EVENTS";
const STATS_MAP: &str = "THROTTLE_STATS";
const OFFSETS_GLOBAL: &str = "THROTTLE_OFFSETS";

/// raw_tp first (no record filled, no BTF parse at attach: see
/// `probes::AttachBtf`), tp_btf where it is refused. The plain tracepoint is no option: its record carries pids, not
/// the task pointers the probe reads the run queue from.
pub const PREFERENCE: [AttachType; 2] = [AttachType::RawTp, AttachType::TpBtf];

/// Where the probe's kernel fields are. Fails on kernels built without
/// group scheduling or CFS bandwidth control (no quota can throttle there).
pub fn resolve_offsets(btf: &Btf) -> Result<ThrottleOffsets, BtfError> {
    let throttled = btf.member("cfs_rq", "throttled")?;
    Ok(ThrottleOffsets {
        task_cfs_rq: btf.offset_of("task_struct", "se")?
            + btf.offset_of("sched_entity", "cfs_rq")?,
        cfs_rq_throttle_count: btf.offset_of("cfs_rq", "throttle_count")?,
        cfs_rq_throttled: throttled.offset,
        cfs_rq_throttled_mask: throttled.u32_mask(),
    })
}

/// Offsets used when this kernel has none: the programs are then never attached.
static UNUSED: ThrottleOffsets = ThrottleOffsets {
    task_cfs_rq: 0,
    cfs_rq_throttle_count: 0,
    cfs_rq_throttled: 0,
    cfs_rq_throttled_mask: 0,
};

pub(super) fn configure<'a>(
    loader: &mut EbpfLoader<'a>,
    offsets: &'a Result<ThrottleOffsets, String>,
) {
    loader.override_global(OFFSETS_GLOBAL, offsets.as_ref().unwrap_or(&UNUSED), true);
}

/// One completed throttle: a container's task stalled on one CPU because
/// its CPU quota (or an ancestor's) ran out for the period.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Throttle {
    /// When the run queue was seen unthrottled (RFC 3339 in JSON).
    #[serde(serialize_with = "crate::events::rfc3339")]
    pub ts: SystemTime,
    /// How long the container could not run on that CPU.
    pub duration_ns: u64,
    pub cpu: u32,
    /// The quota that ran out was an ancestor's (e.g. the pod's), not the container's own.
    pub ancestor: bool,
    /// cgroup v2 id of the stalled task.
    pub cgroup_id: u64,
    /// Boot-clock ns of the start, to group one period's throttles across CPUs.
    #[serde(skip)]
    pub start_boot_ns: u64,
    #[serde(flatten)]
    pub pod: PodIdentity,
}

impl Throttle {
    pub fn decode(raw: &ThrottleEvent, clock: &BootClock) -> Throttle {
        Throttle {
            // Saturating: a corrupt record must not overflow (found by fuzzing).
            ts: clock.to_system_time(raw.start_ns.saturating_add(raw.duration_ns)),
            duration_ns: raw.duration_ns,
            cpu: raw.cpu,
            ancestor: raw.flags & THROTTLE_FLAG_ANCESTOR != 0,
            cgroup_id: raw.cgroup_id,
            start_boot_ns: raw.start_ns,
            pod: PodIdentity::default(),
        }
    }

    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.duration_ns)
    }
}

pub struct ThrottleProbe {
    maps: FamilyMaps,
    clock: BootClock,
    pub attachment: Attachment,
}

impl ThrottleProbe {
    /// Attaches the best hook this kernel allows ([`PREFERENCE`]), or exactly `only`.
    pub fn attach(
        ebpf: &mut Ebpf,
        btf: &super::AttachBtf,
        offsets: &Result<ThrottleOffsets, String>,
        only: Option<AttachType>,
    ) -> Result<ThrottleProbe, ProbeError> {
        if let Err(why) = offsets {
            return Err(ProbeError::Attach {
                family: FAMILY,
                reasons: format!("this kernel's BTF lacks what the probe reads ({why})"),
            });
        }
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
        Ok(ThrottleProbe {
            maps,
            clock: BootClock::new(),
            attachment,
        })
    }

    /// Decodes every event waiting in the ring buffer; returns how many.
    pub fn drain(&mut self, f: impl FnMut(Throttle)) -> usize {
        self.drain_within(&mut Pass::all(), f)
    }

    /// Decodes the events waiting, within one drain pass's bounds.
    pub fn drain_within(&mut self, pass: &mut Pass, mut f: impl FnMut(Throttle)) -> usize {
        let clock = &self.clock;
        self.maps
            .drain(pass, |raw: ThrottleEvent| f(Throttle::decode(&raw, clock)))
    }

    /// `hits`: throttled switch-outs; `filtered`: more tasks of a run queue
    /// already throttled; `lost`: ring full or too many open on one CPU;
    /// `read_errors`: run queues freed while throttled (container removed).
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
        ("throttle", "a throttle"),
        ("sched", "sched_switch"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::fixtures;

    #[test]
    fn resolves_offsets_on_the_recorded_6_1_kernel() {
        let o = resolve_offsets(&fixtures::debian_6_1_btf()).unwrap();
        assert_eq!(o, EXPECTED_6_1);
    }

    // From pahole on the same BTF (task_struct.se + sched_entity.cfs_rq):
    // agent/fixtures/pahole-6.1.0-47-cloud-amd64.txt.
    const EXPECTED_6_1: ThrottleOffsets = ThrottleOffsets {
        task_cfs_rq: 128 + 120,
        cfs_rq_throttle_count: 396,
        cfs_rq_throttled: 392,
        cfs_rq_throttled_mask: u32::MAX,
    };

    #[test]
    fn resolves_the_throttled_bitfield_on_the_running_kernel() {
        let Some(btf) = crate::kernel::btf::running_kernel_for_test(
            "resolves_the_throttled_bitfield_on_the_running_kernel",
        ) else {
            return;
        };
        let o = resolve_offsets(&btf).unwrap();
        let m = btf.member("cfs_rq", "throttled").unwrap();
        // An int before 6.18, a one-bit bool since: either way a mask that fits it.
        if m.bitfield_bits == 1 {
            assert_eq!(o.cfs_rq_throttled_mask, 1 << m.bit);
        } else {
            assert_eq!(o.cfs_rq_throttled_mask, u32::MAX);
        }
    }

    #[test]
    fn decodes_a_raw_event() {
        let raw = ThrottleEvent {
            start_ns: 1_000_000_000,
            duration_ns: 80_000_000,
            cgroup_id: 42,
            cpu: 1,
            flags: THROTTLE_FLAG_ANCESTOR,
        };
        let t = Throttle::decode(&raw, &BootClock::new());
        assert_eq!(t.duration(), Duration::from_millis(80));
        assert!(t.ancestor);
        assert_eq!((t.cgroup_id, t.cpu), (42, 1));
    }

    /// Regression, from the event_decoders fuzz target: a record of all
    /// ones (start and duration near u64::MAX) decodes without overflowing.
    #[test]
    fn a_record_of_all_ones_decodes() {
        let raw: ThrottleEvent = crate::probes::raw_event(&[0xff; 64]).unwrap();
        let t = Throttle::decode(&raw, &BootClock::new());
        assert_eq!(t.duration_ns, u64::MAX);
    }
}
