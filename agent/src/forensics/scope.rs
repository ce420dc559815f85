//! Which limit an OOM kill hit, read from the cgroup files when the event
//! arrives: the container's, the pod's, or none of them (node).
//!
//! The OOM's trigger (the task whose allocation failed) is charged to the
//! cgroup that hit its limit or to one below it, so the scope is the
//! innermost of the trigger's container and pod cgroups that shows it hit
//! its limit:
//! - cgroup v2: `memory.events.local` (else `memory.events`) `oom` grew
//!   since podscope last looked (0 for a cgroup it has not seen);
//! - cgroup v1: `memory.failcnt` is non-zero (a charge failed at this level's
//!   own limit: v1 counts failures only where the limit is) and the peak
//!   `memory.max_usage_in_bytes` reached the limit.
//!
//! Neither: the node ran out, or the cgroup above the pods (kubelet's
//! allocatable enforcement on `kubepods`) — reported with that cgroup when
//! one of the ancestors shows it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use crate::{
    kernel::cgroups::CgroupLayout,
    probes::oom::{OomScope, ScopeReading},
};

/// Slack under the limit that still counts as "reached" for v1's peak: the
/// last charge that failed may have been larger than what was left.
const V1_SLACK_BYTES: u64 = 1 << 20;

/// Values at or above this mean "no limit" (v1 uses PAGE_COUNTER_MAX × page size).
const UNLIMITED: u64 = 1 << 62;

pub struct ScopeReader {
    /// Where each level's memory files are: v2 root or v1 memory mount.
    memory_root: Option<(PathBuf, bool)>,
    /// v2: the `oom` count last seen per cgroup path.
    seen_oom: HashMap<String, u64>,
}

impl ScopeReader {
    /// Memory cgroups whose OOM count is remembered.
    pub fn entries(&self) -> usize {
        self.seen_oom.len()
    }

    /// Forgets the OOM counts of cgroups that are gone: every container an
    /// OOM killed would otherwise stay here for the agent's life.
    pub fn gc(&mut self) {
        let Some((root, _)) = &self.memory_root else {
            return;
        };
        self.seen_oom
            .retain(|rel, _| root.join(rel.trim_start_matches('/')).is_dir());
    }

    pub fn new(layout: &CgroupLayout) -> ScopeReader {
        let memory_root = match layout {
            CgroupLayout::V2 { root } => Some((root.clone(), true)),
            other => other.v1_controller("memory").map(|p| (p.clone(), false)),
        };
        ScopeReader {
            memory_root,
            seen_oom: HashMap::new(),
        }
    }

    /// For tests: a tree laid out like one of the hierarchies.
    pub fn at(root: &Path, v2: bool) -> ScopeReader {
        ScopeReader {
            memory_root: Some((root.to_path_buf(), v2)),
            seen_oom: HashMap::new(),
        }
    }

    /// `container` is the trigger's container cgroup path (relative), if the
    /// trigger was in a container; its parent is the pod's.
    pub fn read(&mut self, container: Option<&str>) -> ScopeReading {
        let node = ScopeReading {
            scope: OomScope::Node,
            cgroup: None,
            usage_bytes: None,
            limit_bytes: None,
        };
        let (Some((root, v2)), Some(container)) = (self.memory_root.clone(), container) else {
            return node;
        };
        let container = container.trim_end_matches('/');
        let pod = parent(container);
        let mut levels = vec![(OomScope::Container, container.to_string())];
        if let Some(pod) = pod {
            levels.push((OomScope::Pod, pod.to_string()));
            // Above the pod: the QoS class and kubepods (allocatable).
            let mut up = parent(pod);
            while let Some(p) = up {
                if p.is_empty() || p == "/" {
                    break;
                }
                levels.push((OomScope::Node, p.to_string()));
                up = parent(p);
            }
        }
        for (scope, rel) in levels {
            let dir = root.join(rel.trim_start_matches('/'));
            let hit = if v2 {
                self.v2_hit(&dir, &rel)
            } else {
                v1_hit(&dir)
            };
            if let Some((usage, limit)) = hit {
                return ScopeReading {
                    scope,
                    cgroup: Some(rel),
                    usage_bytes: usage,
                    limit_bytes: Some(limit),
                };
            }
        }
        node
    }

    fn v2_hit(&mut self, dir: &Path, rel: &str) -> Option<(Option<u64>, u64)> {
        let events = std::fs::read_to_string(dir.join("memory.events.local"))
            .or_else(|_| std::fs::read_to_string(dir.join("memory.events")))
            .ok()?;
        let oom = keyed(&events, "oom")?;
        let before = self.seen_oom.insert(rel.to_string(), oom).unwrap_or(0);
        if oom <= before {
            return None;
        }
        let limit = read_u64(&dir.join("memory.max"))?;
        let usage =
            read_u64(&dir.join("memory.peak")).or_else(|| read_u64(&dir.join("memory.current")));
        Some((usage, limit))
    }
}

/// The scope from the page counters the kernel side read at the OOM (the
/// trigger's memory cgroup first, then its ancestors): the innermost level
/// whose usage reached its limit. `container` is the trigger's container
/// cgroup path when it is in one (level 0 is then the container, 1 the pod).
pub fn from_levels(levels: &[(u64, u64)], container: Option<&str>) -> Option<ScopeReading> {
    if levels.is_empty() {
        return None;
    }
    let hit = levels.iter().position(|&(usage, max)| {
        max < UNLIMITED && usage.saturating_add((max / 50).max(V1_SLACK_BYTES)) >= max
    });
    let Some(i) = hit else {
        return Some(ScopeReading {
            scope: OomScope::Node,
            cgroup: None,
            usage_bytes: None,
            limit_bytes: None,
        });
    };
    let (usage, max) = levels[i];
    let mut path = container.map(|c| c.trim_end_matches('/').to_string());
    for _ in 0..i {
        path = path.as_deref().and_then(parent).map(str::to_string);
    }
    let scope = match (container.is_some(), i) {
        (true, 0) => OomScope::Container,
        (true, 1) => OomScope::Pod,
        _ => OomScope::Node,
    };
    Some(ScopeReading {
        scope,
        cgroup: path.filter(|p| !p.is_empty()),
        usage_bytes: Some(usage),
        limit_bytes: Some(max),
    })
}

fn v1_hit(dir: &Path) -> Option<(Option<u64>, u64)> {
    let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
    if limit >= UNLIMITED {
        return None;
    }
    let failcnt = read_u64(&dir.join("memory.failcnt")).unwrap_or(0);
    let peak = read_u64(&dir.join("memory.max_usage_in_bytes"));
    let reached = peak.is_some_and(|p| p + V1_SLACK_BYTES >= limit);
    (failcnt > 0 && reached).then_some((peak, limit))
}

fn parent(path: &str) -> Option<&str> {
    let (p, _) = path.rsplit_once('/')?;
    Some(p)
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A number, or None for "max" (v2's no limit) and unreadable files.
fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, files: &[(&str, &str)]) {
        let d = root.join(rel);
        std::fs::create_dir_all(&d).unwrap();
        for (f, v) in files {
            std::fs::write(d.join(f), v).unwrap();
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("podscope-scope-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const C: &str = "/kubepods/burstable/podU/cid";

    #[test]
    fn scope_from_the_kernels_page_counters() {
        let unl = u64::MAX / 2;
        let mib = 1u64 << 20;
        let lv = [
            (32 * mib - 8192, 32 * mib),
            (32 * mib, 64 * mib),
            (40 * mib, unl),
        ];
        let r = from_levels(&lv, Some(C)).unwrap();
        assert_eq!(
            (r.scope, r.usage_bytes, r.limit_bytes),
            (OomScope::Container, Some(32 * mib - 8192), Some(32 * mib))
        );
        assert_eq!(r.cgroup.as_deref(), Some(C));
        let pod = [(10 * mib, unl), (64 * mib, 64 * mib), (64 * mib, unl)];
        let r = from_levels(&pod, Some(C)).unwrap();
        assert_eq!(r.scope, OomScope::Pod);
        assert_eq!(r.cgroup.as_deref(), Some("/kubepods/burstable/podU"));
        let alloc = [
            (10 * mib, unl),
            (10 * mib, unl),
            (48 * mib, unl),
            (48 * mib, 48 * mib),
        ];
        let r = from_levels(&alloc, Some(C)).unwrap();
        assert_eq!(
            (r.scope, r.cgroup.as_deref()),
            (OomScope::Node, Some("/kubepods"))
        );
        let global = [(10 * mib, unl), (9000 * mib, unl)];
        assert_eq!(from_levels(&global, Some(C)).unwrap().cgroup, None);
        assert!(from_levels(&[], Some(C)).is_none());
    }

    #[test]
    fn v1_container_limit() {
        let root = tmp("v1c");
        let unl = "9223372036854771712";
        write(&root, "kubepods", &[("memory.limit_in_bytes", unl)]);
        write(
            &root,
            "kubepods/burstable",
            &[("memory.limit_in_bytes", unl)],
        );
        write(
            &root,
            "kubepods/burstable/podU",
            &[
                ("memory.limit_in_bytes", "134217728"),
                ("memory.failcnt", "0"),
                ("memory.max_usage_in_bytes", "67108864"),
            ],
        );
        write(
            &root,
            "kubepods/burstable/podU/cid",
            &[
                ("memory.limit_in_bytes", "67108864"),
                ("memory.failcnt", "1234"),
                ("memory.max_usage_in_bytes", "67108864"),
            ],
        );
        let r = ScopeReader::at(&root, false).read(Some(C));
        assert_eq!(r.scope, OomScope::Container);
        assert_eq!(r.limit_bytes, Some(64 << 20));
        assert_eq!(r.usage_bytes, Some(64 << 20));
        // The pod's limit instead: the container has none.
        write(
            &root,
            "kubepods/burstable/podU/cid",
            &[("memory.limit_in_bytes", unl), ("memory.failcnt", "0")],
        );
        write(
            &root,
            "kubepods/burstable/podU",
            &[
                ("memory.failcnt", "7"),
                ("memory.max_usage_in_bytes", "134217728"),
            ],
        );
        assert_eq!(
            ScopeReader::at(&root, false).read(Some(C)).scope,
            OomScope::Pod
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v1_allocatable_above_the_pod_is_node_scope() {
        let root = tmp("v1n");
        let unl = "9223372036854771712";
        write(
            &root,
            "kubepods",
            &[
                ("memory.limit_in_bytes", "50331648"),
                ("memory.failcnt", "3"),
                ("memory.max_usage_in_bytes", "50331648"),
            ],
        );
        write(
            &root,
            "kubepods/burstable",
            &[("memory.limit_in_bytes", unl)],
        );
        write(
            &root,
            "kubepods/burstable/podU",
            &[("memory.limit_in_bytes", unl)],
        );
        write(
            &root,
            "kubepods/burstable/podU/cid",
            &[("memory.limit_in_bytes", unl)],
        );
        let r = ScopeReader::at(&root, false).read(Some(C));
        assert_eq!(r.scope, OomScope::Node);
        assert_eq!(r.cgroup.as_deref(), Some("/kubepods"));
        // A host process's OOM, or a container's cgroup already gone: node, no cgroup.
        assert_eq!(ScopeReader::at(&root, false).read(None).cgroup, None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Files as a pure cgroup v2 node shows them after a container OOM
    /// (recorded from a 6.1 node with the systemd driver, paths shortened).
    #[test]
    fn v2_counts_new_ooms_only() {
        let root = tmp("v2");
        let events = "low 0\nhigh 0\nmax 412\noom 1\noom_kill 1\noom_group_kill 0\n";
        write(
            &root,
            "kubepods/burstable/podU/cid",
            &[
                ("memory.events.local", events),
                ("memory.max", "67108864"),
                ("memory.peak", "67108864"),
            ],
        );
        write(
            &root,
            "kubepods/burstable/podU",
            &[
                (
                    "memory.events.local",
                    "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
                ),
                ("memory.max", "max"),
            ],
        );
        let mut reader = ScopeReader::at(&root, true);
        let r = reader.read(Some(C));
        assert_eq!(r.scope, OomScope::Container);
        assert_eq!(r.usage_bytes, Some(64 << 20));
        // Nothing new since: another OOM elsewhere is not this container's.
        assert_eq!(reader.read(Some(C)).scope, OomScope::Node);
        // The counts of cgroups that still exist are kept; a removed
        // container's are forgotten.
        let remembered = reader.entries();
        reader.gc();
        assert_eq!(reader.entries(), remembered);
        std::fs::remove_dir_all(root.join("kubepods/burstable/podU/cid")).unwrap();
        reader.gc();
        assert_eq!(reader.entries(), remembered - 1);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
