//! cgroup creation and removal (the attribution family's kernel side): a
//! cgroup made and removed here must come out with its v2 id (the inode of
//! its directory) and its path, on every kernel.

use std::{
    os::unix::fs::MetadataExt,
    time::{Duration, Instant},
};

use super::{Context, Stop, Verdict, ensure_eq, fail};
use crate::{
    kernel::cgroups::CgroupLayout,
    probes::{
        self, KernelOffsets, LoadOptions,
        cgroups::{CgroupChange, CgroupOp, CgroupProbe},
    },
};

const WAIT: Duration = Duration::from_secs(10);

fn wait_for(probe: &mut CgroupProbe, pred: impl Fn(&CgroupChange) -> bool) -> Option<CgroupChange> {
    let deadline = Instant::now() + WAIT;
    let mut found = None;
    while found.is_none() && Instant::now() < deadline {
        probe.drain(|c| {
            if found.is_none() && pred(&c) {
                found = Some(c);
            }
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    found
}

pub fn cgroup_mkdir_rmdir(_: &Context) -> Verdict {
    let Some(root) = CgroupLayout::current().v2_root().cloned() else {
        return Err(Stop::Skip("no cgroup v2 hierarchy is mounted".into()));
    };
    let offsets = KernelOffsets::from_sys_fs()?;
    let mut ebpf = probes::load_object(&offsets, &LoadOptions::default())?;
    let btf = probes::attach_btf();
    let mut probe = CgroupProbe::attach(&mut ebpf, &btf, &offsets.cgroups, None)?;
    let name = format!("podscope-selftest-{}", std::process::id());
    let dir = root.join(&name);
    if let Err(e) = std::fs::create_dir(&dir) {
        fail!("cannot create the cgroup {}: {e}", dir.display());
    }
    let id = std::fs::metadata(&dir).map(|m| m.ino());
    let created = wait_for(&mut probe, |c| {
        c.op == CgroupOp::Created && c.path.ends_with(&name)
    });
    let removed_dir = std::fs::remove_dir(&dir);
    let removed = wait_for(&mut probe, |c| {
        c.op == CgroupOp::Removed && c.path.ends_with(&name)
    });
    let id = id?;
    removed_dir?;
    let Some(created) = created else {
        fail!("no creation event for {}", dir.display())
    };
    ensure_eq!(
        created.id,
        id,
        "cgroup id of the creation (the directory's inode)"
    );
    let Some(removed) = removed else {
        fail!("no removal event for {}", dir.display())
    };
    ensure_eq!(removed.id, id, "cgroup id of the removal");
    Ok(format!(
        "id={id} path={} via {}",
        created.path, probe.attachment.attach_type
    ))
}
