//! OOM kills, from `oom:mark_victim`: the victim, its memory, and the task
//! whose allocation set the OOM killer off. The plain tracepoint, whose
//! record layout comes from tracefs (the memory figures exist from 6.8 on).

use std::{os::fd::RawFd, time::SystemTime};

use agent_common::{
    OFFSET_ABSENT,
    oom::{OOM_FLAG_FIGURES, OOM_FLAG_PARTIAL, OomEvent, OomOffsets},
};
use aya::{Ebpf, EbpfLoader, programs::TracePoint};
use serde::Serialize;

use super::{
    AttachType, Attachment, FamilyMaps, FamilyStats, Pass, ProbeError, error_chain, program,
};
use crate::{
    kernel::{
        btf::{Btf, BtfError},
        clock::BootClock,
        tracefs::{self, TracepointFormat},
    },
    metadata::PodIdentity,
};

pub const FAMILY: &str = crate::families::Kernel::Oom.name();
const HOOK: &str = "oom:mark_victim";
const EVENTS_MAP: &str = "OOM_EVENTS";
const STATS_MAP: &str = "OOM_STATS";

/// The record layout, from tracefs when it is mounted (the defaults are
/// the oldest layout: just `pid`, which every kernel since 4.x has at 8).
pub fn resolve_offsets(btf: &Btf) -> OomOffsets {
    let mut o = match tracefs::ensure_mounted()
        .and_then(|_| TracepointFormat::read("oom", "mark_victim"))
    {
        Ok(f) => offsets_from_format(&f),
        Err(_) => OomOffsets::default(),
    };
    // The memory cgroup's counters: optional (a kernel without memcg has none).
    let memcg = |o: &mut OomOffsets| -> Result<(), BtfError> {
        let id = btf
            .enum_value("cgroup_subsys_id", "memory_cgrp_id")?
            .ok_or(BtfError::NoMember {
                strukt: "cgroup_subsys_id".into(),
                member: "memory_cgrp_id".into(),
            })?;
        let pc = |m| btf.offset_of("page_counter", m);
        let resolved = OomOffsets {
            task_cgroups: btf.offset_of("task_struct", "cgroups")?,
            css_set_subsys: btf.offset_of("css_set", "subsys")?,
            memory_cgrp_id: id as u32,
            memcg_memory: btf.offset_of("mem_cgroup", "memory")?,
            pc_usage: pc("usage")?,
            pc_max: pc("max")?,
            pc_watermark: pc("watermark")?,
            pc_parent: pc("parent")?,
            ..*o
        };
        *o = resolved;
        Ok(())
    };
    let _ = memcg(&mut o);
    o
}

/// The fields that come from the tracepoint's record (the rest from BTF).
fn record_part(o: &OomOffsets) -> [u32; 8] {
    [
        o.tp_pid,
        o.tp_comm,
        o.tp_total_vm,
        o.tp_anon_rss,
        o.tp_file_rss,
        o.tp_shmem_rss,
        o.tp_pgtables,
        o.tp_oom_score_adj,
    ]
}

pub fn offsets_from_format(f: &TracepointFormat) -> OomOffsets {
    let opt = |name| f.offset(name).unwrap_or(OFFSET_ABSENT);
    OomOffsets {
        tp_pid: f.offset("pid").unwrap_or(8),
        tp_comm: opt("comm"),
        tp_total_vm: opt("total_vm"),
        tp_anon_rss: opt("anon_rss"),
        tp_file_rss: opt("file_rss"),
        tp_shmem_rss: opt("shmem_rss"),
        tp_pgtables: opt("pgtables"),
        tp_oom_score_adj: opt("oom_score_adj"),
        ..OomOffsets::default()
    }
}

pub(super) fn configure<'a>(loader: &mut EbpfLoader<'a>, offsets: &'a OomOffsets) {
    loader.override_global("OOM_OFFSETS", offsets, true);
}

/// The victim's memory when it was chosen, in kB (kernel ≥ 6.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VictimMemory {
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub pgtables_kb: u64,
    pub oom_score_adj: i32,
}

/// Which limit was hit: the container's, the pod's, or none of the pod's
/// (the node ran out, or the node's allocatable cgroup above the pods).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize, PartialOrd, Ord,
)]
#[serde(rename_all = "snake_case")]
pub enum OomScope {
    Container,
    Pod,
    Node,
}

impl OomScope {
    pub fn as_str(self) -> &'static str {
        match self {
            OomScope::Container => "container",
            OomScope::Pod => "pod",
            OomScope::Node => "node",
        }
    }
}

/// The scope and the memory figures of the cgroup whose limit was hit,
/// read from its files when the event arrived.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScopeReading {
    pub scope: OomScope,
    /// The cgroup (relative path) whose limit was reached; None for a node-wide OOM.
    pub cgroup: Option<String>,
    /// Its peak usage (v1 max_usage_in_bytes, v2 memory.peak or memory.current).
    pub usage_bytes: Option<u64>,
    pub limit_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OomKill {
    #[serde(serialize_with = "crate::events::rfc3339")]
    pub ts: SystemTime,
    #[serde(skip)]
    pub ts_boot_ns: u64,
    pub victim_pid: u32,
    pub victim_comm: String,
    /// The victim's cgroup v2 id, once known (from the OOM killer's SIGKILL
    /// or the victim's exit).
    pub victim_cgroup_id: u64,
    pub trigger_pid: u32,
    pub trigger_comm: String,
    pub trigger_cgroup_id: u64,
    pub memory: Option<VictimMemory>,
    pub scope: Option<ScopeReading>,
    /// The trigger's memory cgroup and its ancestors at the OOM, innermost
    /// first: (usage, limit) in bytes.
    #[serde(skip)]
    pub memcg: Vec<(u64, u64)>,
    pub partial: bool,
    /// The victim's pod and container.
    #[serde(flatten)]
    pub pod: PodIdentity,
}

impl OomKill {
    pub fn decode(raw: &OomEvent, clock: &BootClock) -> OomKill {
        OomKill {
            ts: clock.to_system_time(raw.ts_boot_ns),
            ts_boot_ns: raw.ts_boot_ns,
            victim_pid: raw.victim_pid,
            victim_comm: super::comm_str(&raw.victim_comm),
            victim_cgroup_id: 0,
            trigger_pid: raw.trigger_tgid,
            trigger_comm: super::comm_str(&raw.trigger_comm),
            trigger_cgroup_id: raw.trigger_cgroup_id,
            memory: (raw.flags & OOM_FLAG_FIGURES != 0).then_some(VictimMemory {
                total_vm_kb: raw.total_vm_kb,
                anon_rss_kb: raw.anon_rss_kb,
                file_rss_kb: raw.file_rss_kb,
                shmem_rss_kb: raw.shmem_rss_kb,
                pgtables_kb: raw.pgtables_kb,
                oom_score_adj: raw.oom_score_adj,
            }),
            scope: None,
            memcg: {
                let page = page_size();
                raw.memcg
                    .iter()
                    .take(raw.memcg_levels as usize)
                    // Saturating: a corrupt record must not overflow (found by fuzzing).
                    .map(|l| {
                        (
                            l.usage_pages.saturating_mul(page),
                            l.max_pages.saturating_mul(page),
                        )
                    })
                    .collect()
            },
            partial: raw.flags & OOM_FLAG_PARTIAL != 0,
            pod: PodIdentity::default(),
        }
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}

pub struct OomProbe {
    maps: FamilyMaps,
    clock: BootClock,
    pub attachment: Attachment,
}

impl OomProbe {
    pub fn attach(ebpf: &mut Ebpf, offsets: &OomOffsets) -> Result<OomProbe, ProbeError> {
        let mut attach = || -> Result<(), String> {
            tracefs::ensure_mounted()?;
            let on_kernel = offsets_from_format(&TracepointFormat::read("oom", "mark_victim")?);
            if record_part(&on_kernel) != record_part(offsets) {
                return Err(format!(
                    "mark_victim's record layout {on_kernel:?} differs from the one loaded {offsets:?}"
                ));
            }
            let prog: &mut TracePoint = program(ebpf, "oom_mark_victim")?;
            prog.load().map_err(|e| error_chain(&e))?;
            prog.attach("oom", "mark_victim")
                .map_err(|e| error_chain(&e))?;
            Ok(())
        };
        attach().map_err(|reasons| ProbeError::Attach {
            family: FAMILY,
            reasons: format!("tracepoint: {reasons}"),
        })?;
        let maps = FamilyMaps::take(ebpf, FAMILY, EVENTS_MAP, STATS_MAP)?;
        Ok(OomProbe {
            maps,
            clock: BootClock::new(),
            attachment: Attachment {
                family: FAMILY,
                hook: HOOK,
                attach_type: AttachType::Tracepoint,
                refused: vec![],
            },
        })
    }

    /// Decodes every event waiting in the ring buffer; returns how many.
    pub fn drain(&mut self, f: impl FnMut(OomKill)) -> usize {
        self.drain_within(&mut Pass::all(), f)
    }

    /// Decodes the events waiting, within one drain pass's bounds.
    pub fn drain_within(&mut self, pass: &mut Pass, mut f: impl FnMut(OomKill)) -> usize {
        let clock = &self.clock;
        self.maps
            .drain_ordered(pass, |raw: OomEvent| f(OomKill::decode(&raw, clock)))
    }

    pub fn stats(&self) -> FamilyStats {
        self.maps.stats()
    }

    pub fn ring_fd(&self) -> RawFd {
        self.maps.ring_fd()
    }
}

impl super::Stamped for OomEvent {
    fn stamp_ns(&self) -> u64 {
        self.ts_boot_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT_6_18: &str = "name: mark_victim\nID: 609\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;\n\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned long anon_rss;\toffset:24;\tsize:8;\tsigned:0;\n\tfield:unsigned long file_rss;\toffset:32;\tsize:8;\tsigned:0;\n\tfield:unsigned long shmem_rss;\toffset:40;\tsize:8;\tsigned:0;\n\tfield:uid_t uid;\toffset:48;\tsize:4;\tsigned:0;\n\tfield:unsigned long pgtables;\toffset:56;\tsize:8;\tsigned:0;\n\tfield:short oom_score_adj;\toffset:64;\tsize:2;\tsigned:1;\n\nprint fmt: \"pid=%d\"\n";
    const FORMAT_6_1: &str = "name: mark_victim\nID: 500\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n\nprint fmt: \"pid=%d\", REC->pid\n";

    #[test]
    fn record_layouts_old_and_new() {
        let new = offsets_from_format(&TracepointFormat::parse(FORMAT_6_18).unwrap());
        assert_eq!(
            (
                new.tp_pid,
                new.tp_comm,
                new.tp_anon_rss,
                new.tp_oom_score_adj
            ),
            (8, 12, 24, 64)
        );
        let old = offsets_from_format(&TracepointFormat::parse(FORMAT_6_1).unwrap());
        assert_eq!(old, OomOffsets::default());
    }

    /// Regression, from the event_decoders fuzz target: a record of all
    /// ones (memcg usage near u64::MAX pages) decodes without overflowing.
    #[test]
    fn a_record_of_all_ones_decodes() {
        let raw: OomEvent = crate::probes::raw_event(&[0xff; 512]).unwrap();
        let k = OomKill::decode(&raw, &BootClock::new());
        assert!(k.memcg.iter().all(|&(usage, _)| usage == u64::MAX));
    }
}
