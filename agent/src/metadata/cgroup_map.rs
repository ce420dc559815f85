//! cgroup v2 id → what its path says (pod uid, container id), learned from a
//! walk of the v2 tree at start-up and from cgroup_mkdir/rmdir events after.
//! Entries of removed cgroups stay for a retention window: exit and OOM
//! events arrive after the directory is gone.

use std::{
    collections::{HashMap, VecDeque},
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
    inserted: Instant,
}

/// Counters that make every degradation visible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupMapStats {
    /// kubepods paths that did not parse (logged once each).
    pub malformed_paths: u64,
    /// Entries refused because the map was full.
    pub refused_full: u64,
    /// Entries evicted after their retention (or earlier, to make room).
    pub evicted: u64,
    /// Live entries whose directory a periodic scan no longer found: their
    /// removal event was lost (a full ring), now corrected.
    pub reconciled_removed: u64,
    /// Directories a periodic scan found that no creation event had told.
    pub reconciled_added: u64,
}

#[derive(Debug)]
pub struct CgroupMap {
    by_id: HashMap<u64, Entry>,
    /// Removed entries, oldest removal first: expiry and eviction at the cap
    /// pop from the front instead of scanning the map.
    removed: VecDeque<(Instant, u64)>,
    cap: usize,
    retention: Duration,
    pub stats: CgroupMapStats,
}

impl CgroupMap {
    pub fn new(cap: usize, retention: Duration) -> CgroupMap {
        CgroupMap {
            by_id: HashMap::new(),
            removed: VecDeque::new(),
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
        for (id, path) in scan(v2_root) {
            self.insert(id, &path);
        }
    }

    /// Corrects the map against a fresh [`scan`] that started at
    /// `scanned_at`: cgroups that exist but were never announced are added,
    /// and live entries older than the scan whose directory is gone are
    /// marked removed (a lost rmdir event must not keep an entry forever).
    pub fn reconcile(&mut self, found: &[(u64, String)], scanned_at: Instant) {
        let present: std::collections::HashSet<u64> = found.iter().map(|(id, _)| *id).collect();
        for (id, path) in found {
            if !self.by_id.contains_key(id) && self.insert(*id, path).is_some() {
                self.stats.reconciled_added += 1;
            }
        }
        let gone: Vec<u64> = self
            .by_id
            .iter()
            .filter(|(id, e)| {
                e.removed.is_none() && e.inserted < scanned_at && !present.contains(id)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove(id);
            self.stats.reconciled_removed += 1;
        }
    }
}

/// Every cgroup directory below `v2_root`: (inode = cgroup id, path relative
/// to the root with a leading `/`). Reads cgroupfs: not for the data path.
pub fn scan(v2_root: &Path) -> Vec<(u64, String)> {
    let mut out = vec![];
    {
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
                    out.push((meta.ino(), format!("/{}", rel.display())));
                }
                // Pod cgroups sit a few levels down; containers may nest their own.
                if depth < 8 {
                    stack.push((path, depth + 1));
                }
            }
        }
    }
    out
}

impl CgroupMap {
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
            // Make room from the longest-removed entry; live ones are never evicted.
            if !self.evict_oldest_removed() {
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
                inserted: Instant::now(),
            },
        );
        Some(pod)
    }

    /// A cgroup was removed: keep it for the retention window.
    pub fn remove(&mut self, id: u64) {
        self.remove_at(id, Instant::now());
    }

    fn remove_at(&mut self, id: u64, now: Instant) {
        if let Some(e) = self.by_id.get_mut(&id)
            && e.removed.is_none()
        {
            e.removed = Some(now);
            self.removed.push_back((now, id));
        }
    }

    /// Pops removal records until one still names a removed entry (ids can
    /// be re-inserted after removal: such stale records are skipped).
    fn evict_oldest_removed(&mut self) -> bool {
        while let Some((at, id)) = self.removed.pop_front() {
            if self.by_id.get(&id).is_some_and(|e| e.removed == Some(at)) {
                self.by_id.remove(&id);
                self.stats.evicted += 1;
                return true;
            }
        }
        false
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

    /// Drops removed cgroups older than the retention. A stale record at
    /// the front (its id came back) is dropped alone: evicting past it
    /// would cut short the retention of the next removal.
    pub fn gc(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.removed.front() {
            if now.saturating_duration_since(at) < self.retention {
                break;
            }
            self.removed.pop_front();
            if self.by_id.get(&id).is_some_and(|e| e.removed == Some(at)) {
                self.by_id.remove(&id);
                self.stats.evicted += 1;
            }
        }
    }

    /// Entries kept only for the retention (their cgroup is gone).
    pub fn retained(&self) -> usize {
        self.by_id.values().filter(|e| e.removed.is_some()).count()
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
    fn a_comeback_does_not_cut_the_next_removal_short() {
        let mut m = CgroupMap::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        m.insert(1, &format!("/kubepods/pod{UID}/abcdef0123456701"));
        m.insert(2, &format!("/kubepods/pod{UID}/abcdef0123456702"));
        // 1 is removed, then found again (a scan): its record goes stale.
        m.remove_at(1, t0);
        m.insert(1, &format!("/kubepods/pod{UID}/abcdef0123456701"));
        m.remove_at(2, t0 + Duration::from_secs(30));
        assert_eq!(m.retained(), 1);
        m.gc(t0 + Duration::from_secs(61));
        assert!(m.get(1).is_some(), "live again: kept");
        assert!(m.get(2).is_some(), "removed 31 s ago: within the retention");
        m.gc(t0 + Duration::from_secs(91));
        assert!(m.get(2).is_none());
        assert_eq!((m.stats.evicted, m.retained()), (1, 0));
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
    fn at_the_cap_the_longest_removed_entry_makes_room() {
        let mut m = CgroupMap::new(2, Duration::from_secs(600));
        m.insert(1, &format!("/kubepods/pod{UID}/abcdef0123456701"));
        m.insert(2, &format!("/kubepods/pod{UID}/abcdef0123456702"));
        m.remove(1);
        assert!(
            m.insert(3, &format!("/kubepods/pod{UID}/abcdef0123456703"))
                .is_some()
        );
        assert!(m.get(1).is_none(), "the removed entry made room");
        assert!(m.get(2).is_some() && m.get(3).is_some());
        assert_eq!(m.stats.evicted, 1);
    }

    #[test]
    fn reconcile_corrects_lost_events() {
        let mut m = CgroupMap::new(10, Duration::from_secs(600));
        m.insert(1, &format!("/kubepods/pod{UID}/abcdef0123456701"));
        m.insert(2, &format!("/kubepods/pod{UID}/abcdef0123456702"));
        let scanned_at = Instant::now();
        // 1's rmdir was lost; 3 was created without an event.
        let found = vec![
            (2, format!("/kubepods/pod{UID}/abcdef0123456702")),
            (3, format!("/kubepods/pod{UID}/abcdef0123456703")),
        ];
        m.reconcile(&found, scanned_at);
        let mut live: Vec<u64> = m.live().map(|(id, _, _)| id).collect();
        live.sort();
        assert_eq!(live, vec![2, 3]);
        assert_eq!(
            (m.stats.reconciled_removed, m.stats.reconciled_added),
            (1, 1)
        );
        // An entry created after the scan started is not judged by it.
        m.insert(4, &format!("/kubepods/pod{UID}/abcdef0123456704"));
        m.reconcile(&found, scanned_at);
        assert!(m.live().any(|(id, _, _)| id == 4));
    }

    #[test]
    fn malformed_paths_are_counted() {
        let mut m = CgroupMap::new(10, Duration::from_secs(60));
        assert!(m.insert(1, "/kubepods/burstable/podbroken/x").is_none());
        assert_eq!(m.stats.malformed_paths, 1);
    }
}
