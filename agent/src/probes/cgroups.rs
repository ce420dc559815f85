//! cgroup creation and removal (v2 hierarchy), which feeds attribution: see
//! `crate::metadata`. tp_btf where allowed, else the plain tracepoints,
//! whose record layout comes from tracefs.

use std::os::fd::RawFd;

use agent_common::cgroups::{
    CGROUP_FIRST_EXEC, CGROUP_FLAG_TRUNCATED, CGROUP_MKDIR, CgroupEvent, CgroupOffsets,
};
use aya::{
    Ebpf, EbpfLoader,
    programs::{BtfTracePoint, RawTracePoint, TracePoint},
};

use super::{
    AttachType, Attachment, FamilyMaps, FamilyStats, Pass, ProbeError, attach_family, error_chain,
    program,
};
use crate::kernel::{
    btf::{Btf, BtfError},
    tracefs::{self, TracepointFormat},
};

pub const FAMILY: &str = crate::families::Kernel::Cgroups.name();
const HOOK: &str = "cgroup:cgroup_mkdir, cgroup:cgroup_rmdir, sched:sched_process_exec";
const EVENTS_MAP: &str = "CGROUP_EVENTS";
const STATS_MAP: &str = "CGROUP_STATS";

/// The record layout of `cgroup:cgroup_mkdir` on 5.x and 6.x kernels, used
/// when tracefs is not mounted at load time; checked against tracefs before
/// the plain tracepoints are attached.
const RECORD_DEFAULT: (u32, u32, u32) = (8, 16, 24);

pub fn resolve_offsets(btf: &Btf) -> Result<CgroupOffsets, BtfError> {
    let (tp_root, tp_id, tp_path) = match tracefs::mounted().map(|_| record_layout()) {
        Some(Ok(l)) => l,
        _ => RECORD_DEFAULT,
    };

    Ok(CgroupOffsets {
        cgroup_kn: btf.offset_of("cgroup", "kn")?,
        kn_id: btf.offset_of("kernfs_node", "id")?,
        cgroup_root: btf.offset_of("cgroup", "root")?,
        root_hierarchy_id: btf.offset_of("cgroup_root", "hierarchy_id")?,
        tp_root,
        tp_id,
        tp_path,
        _pad: 0,
    })
}

fn record_layout() -> Result<(u32, u32, u32), String> {
    let f = TracepointFormat::read("cgroup", "cgroup_mkdir")?;
    Ok((f.offset("root")?, f.offset("id")?, f.offset("path")?))
}

pub(super) fn configure<'a>(loader: &mut EbpfLoader<'a>, offsets: &'a CgroupOffsets) {
    loader.override_global("CGROUP_OFFSETS", offsets, true);
}

/// What happened to a v2 cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupOp {
    Created,
    Removed,
    /// The first exec in it since it was created, by this process: in a
    /// container's cgroup, the entrypoint, i.e. the main process.
    FirstExec {
        tgid: u32,
    },
}

/// A v2 cgroup was created, removed, or saw its first exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupChange {
    pub id: u64,
    pub op: CgroupOp,
    /// Empty for `FirstExec`.
    pub path: String,
    pub truncated: bool,
}

impl CgroupChange {
    pub fn decode(raw: &CgroupEvent) -> CgroupChange {
        CgroupChange {
            id: raw.id,
            op: match raw.op {
                CGROUP_MKDIR => CgroupOp::Created,
                CGROUP_FIRST_EXEC => CgroupOp::FirstExec { tgid: raw.pid },
                _ => CgroupOp::Removed,
            },
            path: super::comm_str(&raw.path),
            truncated: raw.flags & CGROUP_FLAG_TRUNCATED != 0,
        }
    }
}

pub struct CgroupProbe {
    maps: FamilyMaps,
    pub attachment: Attachment,
}

impl CgroupProbe {
    pub fn attach(
        ebpf: &mut Ebpf,
        btf: &super::AttachBtf,
        offsets: &CgroupOffsets,
        only: Option<AttachType>,
    ) -> Result<CgroupProbe, ProbeError> {
        // raw_tp first: no BTF parse at attach (see `probes::AttachBtf`).
        // `only` forces one (tests).
        let kinds = [AttachType::RawTp, AttachType::TpBtf, AttachType::Tracepoint]
            .into_iter()
            .filter(|k| only.is_none_or(|o| o == *k));
        let (maps, attachment) = attach_family(
            ebpf,
            (FAMILY, HOOK),
            (EVENTS_MAP, STATS_MAP),
            kinds,
            |ebpf, kind| attach_pair(ebpf, btf, offsets, kind),
        )?;
        Ok(CgroupProbe { maps, attachment })
    }

    /// Decodes every event waiting in the ring buffer; returns how many.
    pub fn drain(&mut self, f: impl FnMut(CgroupChange)) -> usize {
        self.drain_within(&mut Pass::all(), f)
    }

    /// Decodes the events waiting, within one drain pass's bounds.
    pub fn drain_within(&mut self, pass: &mut Pass, mut f: impl FnMut(CgroupChange)) -> usize {
        self.maps
            .drain(pass, |raw: CgroupEvent| f(CgroupChange::decode(&raw)))
    }

    pub fn stats(&self) -> FamilyStats {
        self.maps.stats()
    }

    pub fn ring_fd(&self) -> RawFd {
        self.maps.ring_fd()
    }
}

fn attach_pair(
    ebpf: &mut Ebpf,
    btf: &super::AttachBtf,
    offsets: &CgroupOffsets,
    kind: AttachType,
) -> Result<(), String> {
    match kind {
        AttachType::RawTp => {
            for (prog, hook) in [
                ("cgroup_mkdir_raw_tp", "cgroup_mkdir"),
                ("cgroup_rmdir_raw_tp", "cgroup_rmdir"),
                ("cgroup_exec_raw_tp", "sched_process_exec"),
            ] {
                let p: &mut RawTracePoint = program(ebpf, prog)?;
                p.load().map_err(|e| error_chain(&e))?;
                p.attach(hook).map_err(|e| error_chain(&e))?;
            }
        }
        AttachType::TpBtf => {
            let btf = btf
                .get()
                .ok_or("the kernel's BTF could not be read by aya")?;
            for (prog, hook) in [
                ("cgroup_mkdir_tp_btf", "cgroup_mkdir"),
                ("cgroup_rmdir_tp_btf", "cgroup_rmdir"),
                ("cgroup_exec_tp_btf", "sched_process_exec"),
            ] {
                let p: &mut BtfTracePoint = program(ebpf, prog)?;
                p.load(hook, btf).map_err(|e| error_chain(&e))?;
                p.attach().map_err(|e| error_chain(&e))?;
            }
        }
        AttachType::Tracepoint => {
            tracefs::ensure_mounted()?;
            let layout = record_layout()?;
            let loaded = (offsets.tp_root, offsets.tp_id, offsets.tp_path);
            if layout != loaded {
                return Err(format!(
                    "cgroup_mkdir's record layout on this kernel {layout:?} differs from the one loaded {loaded:?}: mount tracefs before starting podscope"
                ));
            }
            for (prog, category, hook) in [
                ("cgroup_mkdir_tracepoint", "cgroup", "cgroup_mkdir"),
                ("cgroup_rmdir_tracepoint", "cgroup", "cgroup_rmdir"),
                ("cgroup_exec_tracepoint", "sched", "sched_process_exec"),
            ] {
                let p: &mut TracePoint = program(ebpf, prog)?;
                p.load().map_err(|e| error_chain(&e))?;
                p.attach(category, hook).map_err(|e| error_chain(&e))?;
            }
        }
        other => return Err(format!("{other} is not a cgroup hook")),
    }
    Ok(())
}
