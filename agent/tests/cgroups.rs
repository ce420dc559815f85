//! The cgroup probe and path-based attribution on the real kernel, without a
//! container runtime: the test makes kubelet-shaped cgroups itself (below a
//! directory of its own in the v2 tree), runs processes in them, and removes
//! the cgroups before it reads the events, as happens when a container exits.
//! Needs root.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use aya::Ebpf;
use podscope::{
    kernel::cgroups::CgroupLayout,
    metadata::{Resolver, ResolverOptions},
    probes::{
        self, AttachType, KernelOffsets, LoadOptions,
        cgroups::{CgroupChange, CgroupOp, CgroupProbe},
        exits::{Exit, ExitProbe},
    },
};
use support::privileged;

const UID: &str = "5d1c7f3e-2b4a-4c6d-8e9f-0a1b2c3d4e5f";
const CID: &str = "c0ffee0123456789abcdef0123456789abcdef0123456789abcdef0123456789";

/// A directory of this test's own in the v2 tree, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Option<Scratch> {
        let root = CgroupLayout::current().v2_root()?.clone();
        let dir = root.join(format!("podscope-test-{tag}-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        Some(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Leaves first: cgroup directories are removed with rmdir, one by one.
        let mut dirs = vec![];
        let mut stack = vec![self.0.clone()];
        while let Some(d) = stack.pop() {
            dirs.push(d.clone());
            if let Ok(rd) = std::fs::read_dir(&d) {
                stack.extend(rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
            }
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().ino()
}

struct Probes {
    exits: ExitProbe,
    cgroups: CgroupProbe,
    _ebpf: Ebpf,
}

fn attach(kind: Option<AttachType>) -> Probes {
    let offsets = KernelOffsets::from_sys_fs().unwrap();
    let mut ebpf = probes::load_object(&offsets, &LoadOptions::default()).unwrap();
    let btf = probes::attach_btf();
    let cgroups = CgroupProbe::attach(&mut ebpf, &btf, &offsets.cgroups, kind).unwrap();
    // The default needs no BTF parse by aya (start-up memory).
    assert_eq!(
        cgroups.attachment.attach_type,
        kind.unwrap_or(AttachType::RawTp)
    );
    let exits = ExitProbe::attach(&mut ebpf, &btf, None).unwrap();
    Probes {
        exits,
        cgroups,
        _ebpf: ebpf,
    }
}

fn changes_until(p: &mut CgroupProbe, pred: impl Fn(&[CgroupChange]) -> bool) -> Vec<CgroupChange> {
    let mut all = vec![];
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline && !pred(&all) {
        p.drain(|c| all.push(c));
        std::thread::sleep(Duration::from_millis(5));
    }
    all
}

fn sees_mkdir_and_rmdir(kind: Option<AttachType>, tag: &str) {
    let mut p = attach(kind);
    let scratch = Scratch::new(tag).expect("a cgroup v2 tree to write to");
    let dir = scratch.0.join("child");
    std::fs::create_dir(&dir).unwrap();
    let id = inode(&dir);
    std::fs::remove_dir(&dir).unwrap();
    let rel = format!(
        "/{}/child",
        scratch.0.file_name().unwrap().to_string_lossy()
    );
    let all = changes_until(&mut p.cgroups, |all| {
        all.iter().any(|c| c.id == id && c.op == CgroupOp::Removed)
    });
    let made = all
        .iter()
        .find(|c| c.id == id && c.op == CgroupOp::Created)
        .expect("mkdir seen");
    assert_eq!(made.path, rel);
    assert!(!made.truncated);
    assert!(
        all.iter().any(|c| c.id == id && c.op == CgroupOp::Removed),
        "rmdir seen"
    );
    assert_eq!(p.cgroups.stats().lost, 0);

    // A v1 hierarchy's cgroup ids mean nothing to bpf_get_current_cgroup_id():
    // its mkdirs are dropped in the kernel (and counted as filtered).
    if let Some(v1) = CgroupLayout::current().v1_controller("pids").cloned() {
        let before = p.cgroups.stats().filtered;
        let d = v1.join(format!("podscope-test-{tag}-{}", std::process::id()));
        std::fs::create_dir(&d).unwrap();
        std::fs::remove_dir(&d).unwrap();
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        let all = changes_until(&mut p.cgroups, |_| false);
        assert!(
            all.iter().all(|c| !c.path.contains(&name)),
            "a v1 cgroup was reported: {all:?}"
        );
        assert!(
            p.cgroups.stats().filtered >= before + 2,
            "mkdir and rmdir filtered"
        );
    }
}

#[test]
fn cgroup_probe_sees_v2_mkdir_and_rmdir_with_raw_tp() {
    if privileged("cgroup_probe_sees_v2_mkdir_and_rmdir_with_raw_tp") {
        sees_mkdir_and_rmdir(None, "raw");
    }
}

#[test]
fn cgroup_probe_sees_v2_mkdir_and_rmdir_with_tp_btf() {
    if privileged("cgroup_probe_sees_v2_mkdir_and_rmdir_with_tp_btf") {
        sees_mkdir_and_rmdir(Some(AttachType::TpBtf), "btf");
    }
}

#[test]
fn cgroup_probe_sees_v2_mkdir_and_rmdir_with_plain_tracepoints() {
    if privileged("cgroup_probe_sees_v2_mkdir_and_rmdir_with_plain_tracepoints") {
        let was_mounted = podscope::kernel::tracefs::mounted().is_some();
        sees_mkdir_and_rmdir(Some(AttachType::Tracepoint), "tp");
        if !was_mounted {
            unsafe { libc::umount2(c"/sys/kernel/tracing".as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// A process in a kubelet-shaped cgroup exits, the cgroup is removed at
/// once, and only then are the events read: the exit still names its pod
/// uid and container id, from the path learned at mkdir.
#[test]
fn an_exit_is_attributed_after_its_cgroup_is_gone() {
    if !privileged("an_exit_is_attributed_after_its_cgroup_is_gone") {
        return;
    }
    let mut p = attach(None);
    let scratch = Scratch::new("attr").expect("a cgroup v2 tree to write to");
    let container = scratch.0.join(format!("kubepods/burstable/pod{UID}/{CID}"));
    std::fs::create_dir_all(&container).unwrap();
    let procs = container.join("cgroup.procs");
    let status = Command::new("sh")
        .args(["-c", &format!("echo $$ > {} && exit 3", procs.display())])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3));
    // The container is gone before anyone looked.
    drop(scratch);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let found = rt.block_on(async {
        let mut resolver = Resolver::new(&ResolverOptions {
            use_cri: false,
            ..Default::default()
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            p.cgroups.drain(|c| match c.op {
                CgroupOp::Created => resolver.cgroup_created(c.id, &c.path),
                CgroupOp::Removed => resolver.cgroup_removed(c.id),
                CgroupOp::FirstExec { .. } => {}
            });
            let mut exits: Vec<Exit> = vec![];
            p.exits.drain(|e| exits.push(e));
            for mut e in exits {
                if e.comm == "sh" && e.exit_code == Some(3) {
                    e.pod = resolver.identify(e.cgroup_id);
                    if e.pod.pod_uid.is_some() {
                        return Some(e);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    });
    let e = found.expect("the exit, attributed");
    assert_eq!(e.pod.pod_uid.as_deref(), Some(UID));
    assert_eq!(e.pod.container_id.as_deref(), Some(CID));
    assert_eq!(e.pod.container, None, "no names without CRI");
}
