//! `down`: removes everything `up` and the pods created, and nothing else.
//!
//! `up` records what already existed before it first ran (the `/run/netns`
//! mount `ip netns` creates, `/run/containerd` where containerd 1.6 always
//! puts shim sockets, `/var/lib/cni`, each hierarchy's `kubepods` cgroup), so
//! `down` removes only what the node added. Processes are ended by recorded
//! PID, or as shims whose command line names our socket, or as members of
//! our pods' cgroups; never by name.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    containerd,
    cri::Cri,
    error::{Error, IoContext, Result},
    netns, paths, process, status,
};

/// What existed before the first `up`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Preexisting {
    pub netns_dir: bool,
    pub run_containerd: bool,
    pub var_lib_cni: bool,
    /// Cgroup hierarchies (e.g. `/sys/fs/cgroup/cpu,cpuacct`) that already had `kubepods`.
    pub kubepods: Vec<PathBuf>,
}

const RUN_CONTAINERD: &str = "/run/containerd";
const VAR_LIB_CNI: &str = "/var/lib/cni";

/// Records what exists now, unless a record exists already (a second `up`
/// must not mistake the first one's leftovers for the machine's).
pub fn record_preexisting() -> Result<()> {
    let p = paths::preexisting();
    if p.exists() {
        return Ok(());
    }
    let rec = Preexisting {
        netns_dir: Path::new(netns::NETNS_DIR).exists(),
        run_containerd: Path::new(RUN_CONTAINERD).exists(),
        var_lib_cni: Path::new(VAR_LIB_CNI).exists(),
        kubepods: hierarchies()
            .into_iter()
            .filter(|h| h.join(paths::KUBEPODS).exists())
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&rec)
        .map_err(|e| Error::Msg(format!("cannot encode {}: {e}", p.display())))?;
    std::fs::write(&p, json).ctx(|| format!("cannot write {}", p.display()))
}

fn read_preexisting() -> Option<Preexisting> {
    serde_json::from_slice(&std::fs::read(paths::preexisting()).ok()?).ok()
}

/// Every mounted cgroup hierarchy (v1 controllers and the v2 tree),
/// canonical and without duplicates (`cpu` links to `cpu,cpuacct`).
pub fn hierarchies() -> Vec<PathBuf> {
    let mut set = BTreeSet::new();
    let root = Path::new(paths::CGROUP_ROOT);
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            if let Ok(p) = e.path().canonicalize()
                && p.join("cgroup.procs").exists()
            {
                set.insert(p);
            }
        }
    }
    // A pure v2 machine has the tree at the root itself.
    if root.join("cgroup.controllers").exists() {
        set.insert(root.to_path_buf());
    }
    set.into_iter().collect()
}

/// Every pod uid the node created: the ledger, status files and manifests.
fn our_uids() -> BTreeSet<String> {
    let mut uids: BTreeSet<String> = std::fs::read_to_string(paths::uid_ledger())
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    for s in status::read_all().unwrap_or_default() {
        uids.insert(s.uid);
    }
    uids
}

/// Removes everything; returns one line per thing it did.
pub async fn down() -> Result<Vec<String>> {
    let mut done = Vec::new();
    let pre = read_preexisting();
    let uids = our_uids();
    let mut netns_paths: Vec<String> = status::read_all()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|s| s.netns_path)
        .collect();

    // 1. The kubelet daemon first, so it does not recreate what we remove.
    if let Some(pid) = process::recorded(&paths::kubelet_pid(), "podscope-testnode kubelet") {
        process::terminate(pid, Duration::from_secs(5))?;
        done.push(format!("stopped the kubelet daemon (pid {pid})"));
    }

    // 2. Pods, through CRI, while our containerd still runs.
    if containerd::running().is_some()
        && let Ok(mut cri) = Cri::connect(paths::SOCKET).await
    {
        let sandboxes = cri.list_sandboxes().await.unwrap_or_default();
        for sb in &sandboxes {
            if let Ok((_, Some(info))) = cri.sandbox_status(&sb.id).await
                && let Some(p) = info
                    .pointer("/runtimeSpec/linux/namespaces")
                    .and_then(|n| n.as_array())
                    .and_then(|a| {
                        a.iter().find_map(|n| {
                            (n.get("type")?.as_str()? == "network")
                                .then(|| n.get("path")?.as_str().map(str::to_string))?
                        })
                    })
            {
                netns_paths.push(p);
            }
            let _ = cri.stop_sandbox(&sb.id).await;
            if let Err(e) = cri.remove_sandbox(&sb.id).await {
                done.push(format!("could not remove sandbox {}: {e}", short(&sb.id)));
            }
        }
        if !sandboxes.is_empty() {
            done.push(format!("removed {} pod sandbox(es)", sandboxes.len()));
        }
    }

    // 3. containerd, by recorded PID.
    if let Some(pid) = containerd::stop()? {
        done.push(format!("stopped containerd (pid {pid})"));
    }

    // 4. Shims of our containerd (their command line names our socket), then
    //    anything still inside our pods' cgroups.
    let shims = shim_pids();
    for pid in &shims {
        process::signal(*pid, libc::SIGKILL);
    }
    for pid in &shims {
        process::wait_gone(*pid, Duration::from_secs(5));
    }
    if !shims.is_empty() {
        done.push(format!("killed {} leftover shim(s)", shims.len()));
    }

    // 5. Mounts under our directories and the pods' network namespaces.
    let unmounted = unmount_under(&[paths::STATE_DIR, paths::ROOT_DIR]);
    if unmounted > 0 {
        done.push(format!(
            "unmounted {unmounted} mount(s) under the state directories"
        ));
    }
    for p in netns_paths {
        let p = Path::new(&p);
        if p.exists() {
            unmount(p);
            let _ = std::fs::remove_file(p);
            done.push(format!("removed pod network namespace {}", p.display()));
        }
    }

    // 6. The node's network namespace (its bridge and veths go with it).
    if netns::delete()? {
        done.push(format!("deleted network namespace {}", paths::NETNS));
    }
    if let Some(pre) = &pre {
        if !pre.netns_dir && dir_is_empty(Path::new(netns::NETNS_DIR)) {
            unmount(Path::new(netns::NETNS_DIR));
            let _ = std::fs::remove_dir(netns::NETNS_DIR);
        }
        if !pre.run_containerd {
            let _ = std::fs::remove_dir(Path::new(RUN_CONTAINERD).join("s"));
            let _ = std::fs::remove_dir(RUN_CONTAINERD);
        }
        if !pre.var_lib_cni && Path::new(VAR_LIB_CNI).exists() {
            let _ = std::fs::remove_dir_all(VAR_LIB_CNI);
        }
    }

    // 7. Cgroups: our pods' in every hierarchy; the kubepods tree itself
    //    where it did not exist before.
    let removed = remove_cgroups(&uids, pre.as_ref());
    if removed > 0 {
        done.push(format!("removed {removed} cgroup director(ies)"));
    }

    // 8. The state directories, last: they hold what the steps above needed.
    for dir in [paths::STATE_DIR, paths::ROOT_DIR] {
        if Path::new(dir).exists() {
            std::fs::remove_dir_all(dir).ctx(|| format!("cannot remove {dir}"))?;
            done.push(format!("removed {dir}"));
        }
    }
    Ok(done)
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn dir_is_empty(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut rd| rd.next().is_none())
}

/// containerd-shim processes serving our socket.
pub fn shim_pids() -> Vec<i32> {
    let needle = format!("-address {}", paths::SOCKET);
    let mut pids = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if process::cmdline(pid)
                .is_some_and(|c| c.contains("containerd-shim") && c.contains(&needle))
            {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Mount points at or under any of `roots`, deepest first.
pub fn mounts_under(roots: &[&str]) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount)
        .filter(|m| {
            roots
                .iter()
                .any(|r| m == r || m.starts_with(&format!("{r}/")))
        })
        .map(PathBuf::from)
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// mountinfo escapes spaces and the like as `\040`.
fn unescape_mount(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

fn unmount(p: &Path) {
    if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
        // Lazy: a busy mount is detached now and freed when last used.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn unmount_under(roots: &[&str]) -> usize {
    let mut n = 0;
    // A mount can hide another at the same point: repeat until none is left.
    for _ in 0..5 {
        let mounts = mounts_under(roots);
        if mounts.is_empty() {
            break;
        }
        for m in &mounts {
            unmount(m);
            n += 1;
        }
    }
    n
}

/// The cgroup directories to remove in one hierarchy: our pods' (with
/// their containers), and the whole kubepods tree if the node created it.
fn removable(h: &Path, uids: &BTreeSet<String>, pre: Option<&Preexisting>) -> Vec<PathBuf> {
    let kubepods = h.join(paths::KUBEPODS);
    if !kubepods.exists() {
        return Vec::new();
    }
    let ours_entirely = pre.is_some_and(|p| !p.kubepods.iter().any(|k| k == h));
    if ours_entirely {
        return vec![kubepods];
    }
    let mut v = Vec::new();
    for uid in uids {
        for qos in ["", "burstable/", "besteffort/"] {
            let d = kubepods.join(format!("{qos}pod{uid}"));
            if d.exists() {
                v.push(d);
            }
        }
    }
    v
}

/// Every directory in the tree under `root`, deepest first.
fn tree_leaves_first(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out.push(d);
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

fn remove_cgroups(uids: &BTreeSet<String>, pre: Option<&Preexisting>) -> usize {
    let mut removed = 0;
    for h in hierarchies() {
        for top in removable(&h, uids, pre) {
            removed += remove_tree(&top);
        }
    }
    removed
}

/// A deleted pod's cgroup (`cgroup_parent`, e.g.
/// `/kubepods/burstable/pod<uid>`) in every hierarchy, as kubelet's pod
/// container manager destroys it once the sandbox is gone: runc removes
/// only the containers' own cgroups. Returns the directories removed.
pub fn remove_pod_cgroup(cgroup_parent: &str) -> usize {
    let rel = cgroup_parent.trim_start_matches('/');
    // Only a pod's own directory, never a QoS or the kubepods root.
    if !rel.starts_with(paths::KUBEPODS)
        || !rel.rsplit('/').next().is_some_and(|l| l.starts_with("pod"))
    {
        return 0;
    }
    hierarchies()
        .iter()
        .map(|h| h.join(rel))
        .filter(|d| d.exists())
        .map(|d| remove_tree(&d))
        .sum()
}

/// Removes a cgroup tree, deepest first, killing what is left in it.
fn remove_tree(top: &Path) -> usize {
    let mut removed = 0;
    let dirs = tree_leaves_first(top);
    // Processes left in them (a container whose shim was killed) end here.
    for d in &dirs {
        for pid in std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
        {
            process::signal(pid, libc::SIGKILL);
        }
    }
    for d in &dirs {
        // rmdir fails while the killed processes are still exiting.
        for _ in 0..50 {
            if std::fs::remove_dir(d).is_ok() || !d.exists() {
                removed += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mount(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }

    #[test]
    fn removable_respects_what_existed() {
        let tmp = std::env::temp_dir().join(format!("podscope-cleanup-{}", std::process::id()));
        let pod = tmp.join("kubepods/burstable/podU1");
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::create_dir_all(tmp.join("kubepods/burstable/podOTHER")).unwrap();
        let uids: BTreeSet<String> = ["U1".to_string()].into();
        let theirs = Preexisting {
            kubepods: vec![tmp.clone()],
            ..Default::default()
        };
        assert_eq!(removable(&tmp, &uids, Some(&theirs)), vec![pod]);
        let ours = Preexisting::default();
        assert_eq!(
            removable(&tmp, &uids, Some(&ours)),
            vec![tmp.join("kubepods")]
        );
        let leaves = tree_leaves_first(&tmp.join("kubepods"));
        assert_eq!(leaves.last(), Some(&tmp.join("kubepods")));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
