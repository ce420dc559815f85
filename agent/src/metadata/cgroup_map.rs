//! cgroup v2 id → what its path says (pod uid, container id), learned from a
//! walk of the v2 tree at start-up and from cgroup_mkdir/rmdir events after.
//! Entries of removed cgroups stay for a retention window: exit and OOM
//! events arrive after the directory is gone.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use super::cgroup_path::{self, CgroupRef};

#[derive(Debug)]
struct Entry {
    pod: Arc<CgroupRef>,
    /// Relative to the v2 root: where the cgroup's own files (cpu.stat) are.
    path: Arc<str>,
    removed: Option<Instant>,
}

/// Counters that make every degradation visible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupMapStats {
    /// kubepods paths that did not parse (logged once each).
    pub malformed_paths: u64,
    /// Entries refused because the map was full.
    pub refused_full: u64,
    /// Entries evicted after their retention.
    pub evicted: u64,
}

#[derive(Debug)]
pub struct CgroupMap {
    by_id: HashMap<u64, Entry>,
    cap: usize,
    retention: Duration,
    pub stats: CgroupMapStats,
}

impl CgroupMap {
    pub fn new(cap: usize, retention: Duration) -> CgroupMap {
        CgroupMap {
            by_id: HashMap::new(),
            cap,
            retention,
            stats: CgroupMapStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Records every pod cgroup below `v2_root` (the inode of a v2 cgroup
    /// directory is its cgroup id).
    pub fn scan(&mut self, v2_root: &Path) {
        let mut stack = vec![(v2_root.to_path_buf(), 0u32)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                if !meta.is_dir() {
                    continue;
                }
                let path = e.path();
                if let Ok(rel) = path.strip_prefix(v2_root) {
                    self.insert(meta.ino(), &format!("/{}", rel.display()));
                }
                // Pod cgroups sit a few levels down; containers may nest their own.
                if depth < 8 {
                    stack.push((path, depth + 1));
                }
            }
        }
    }

    /// A cgroup was created (or found). Returns what its path says, if it is a pod's.
    pub fn insert(&mut self, id: u64, path: &str) -> Option<Arc<CgroupRef>> {
        let pod = match cgroup_path::parse(path) {
            Ok(Some(p)) => Arc::new(p),
            Ok(None) => return None,
            Err(e) => {
                self.stats.malformed_paths += 1;
                if self.stats.malformed_paths <= 10 {
                    tracing::warn!("{e}; its events are shown as the host's");
                }
                return None;
            }
        };
        if self.by_id.len() >= self.cap && !self.by_id.contains_key(&id) {
            self.gc(Instant::now());
            if self.by_id.len() >= self.cap {
                self.stats.refused_full += 1;
                return None;
            }
        }
        self.by_id.insert(
            id,
            Entry {
                pod: pod.clone(),
                path: path.into(),
                removed: None,
            },
        );
        Some(pod)
    }

    /// A cgroup was removed: keep it for the retention window.
    pub fn remove(&mut self, id: u64) {
        if let Some(e) = self.by_id.get_mut(&id) {
            e.removed.get_or_insert_with(Instant::now);
        }
    }

    pub fn get(&self, id: u64) -> Option<&Arc<CgroupRef>> {
        self.by_id.get(&id).map(|e| &e.pod)
    }

    /// The cgroup's path relative to the hierarchy's root.
    pub fn path(&self, id: u64) -> Option<&str> {
        self.by_id.get(&id).map(|e| &*e.path)
    }

    /// Every pod cgroup still present: (id, path, what the path says).
    pub fn live(&self) -> impl Iterator<Item = (u64, &str, &Arc<CgroupRef>)> {
        self.by_id
            .iter()
            .filter(|(_, e)| e.removed.is_none())
            .map(|(id, e)| (*id, &*e.path, &e.pod))
    }

    /// Containers' cgroups that exist now: (id, path relative to the v2 root).
    pub fn live_containers(&self) -> impl Iterator<Item = (u64, &Arc<str>)> {
        self.by_id
            .iter()
            .filter(|(_, e)| e.removed.is_none() && e.pod.container_id.is_some())
            .map(|(id, e)| (*id, &e.path))
    }

    /// Drops removed cgroups older than the retention.
    pub fn gc(&mut self, now: Instant) {
        let before = self.by_id.len();
        let retention = self.retention;
        self.by_id
            .retain(|_, e| e.removed.is_none_or(|t| now.duration_since(t) < retention));
        self.stats.evicted += (before - self.by_id.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f5e3c1a-7b2d-4e8f-9a6c-1d2e3f4a5b6c";

    #[test]
    fn removed_cgroups_live_for_the_retention_then_go() {
        let mut m = CgroupMap::new(10, Duration::from_secs(60));
        let p = m
            .insert(7, &format!("/kubepods/pod{UID}/abcdef0123456789"))
            .unwrap();
        assert_eq!(p.container_id.as_deref(), Some("abcdef0123456789"));
        assert!(
            m.insert(8, "/system.slice/ssh.service").is_none(),
            "host cgroups are not kept"
        );
        let live: Vec<_> = m
            .live_containers()
            .map(|(id, p)| (id, p.to_string()))
            .collect();
        assert_eq!(
            live,
            vec![(7, format!("/kubepods/pod{UID}/abcdef0123456789"))]
        );
        m.remove(7);
        assert_eq!(m.live_containers().count(), 0);
        m.gc(Instant::now());
        assert!(m.get(7).is_some(), "still within the retention");
        m.gc(Instant::now() + Duration::from_secs(61));
        assert!(m.get(7).is_none());
        assert_eq!(m.stats.evicted, 1);
    }

    #[test]
    fn the_cap_is_enforced_and_counted() {
        let mut m = CgroupMap::new(2, Duration::from_secs(60));
        for id in 0..3u64 {
            m.insert(id, &format!("/kubepods/pod{UID}/abcdef01234567{id:02}"));
        }
        assert_eq!(m.len(), 2);
        assert_eq!(m.stats.refused_full, 1);
    }

    #[test]
    fn malformed_paths_are_counted() {
        let mut m = CgroupMap::new(10, Duration::from_secs(60));
        assert!(m.insert(1, "/kubepods/burstable/podbroken/x").is_none());
        assert_eq!(m.stats.malformed_paths, 1);
    }
}
