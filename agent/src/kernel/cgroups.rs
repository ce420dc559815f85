//! Which cgroup hierarchies this node has: v2 only, v1 only, or hybrid (v1
//! controllers plus a controller-less v2 tree, as on this project's test
//! machines). Read from /proc/self/mountinfo.

use std::{fs, path::PathBuf};

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupLayout {
    /// Pure cgroup v2: one unified tree with the controllers.
    V2 { root: PathBuf },
    /// Only v1 hierarchies; `bpf_get_current_cgroup_id()` means nothing here.
    V1 { controllers: Vec<(String, PathBuf)> },
    /// v1 controllers with a v2 tree beside them (systemd's "hybrid").
    Hybrid {
        v2_root: PathBuf,
        controllers: Vec<(String, PathBuf)>,
    },
    /// No cgroup filesystem mounted at all.
    None,
}

impl CgroupLayout {
    pub fn current() -> CgroupLayout {
        match fs::read_to_string("/proc/self/mountinfo") {
            Ok(s) => CgroupLayout::from_mountinfo(&s),
            Err(_) => CgroupLayout::None,
        }
    }

    pub fn from_mountinfo(mountinfo: &str) -> CgroupLayout {
        let mut v2 = None;
        let mut controllers = vec![];
        for line in mountinfo.lines() {
            // "<id> <parent> <maj:min> <root> <mountpoint> <opts> [optional...] - <fstype> <source> <superopts>"
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split(' ').nth(4).unwrap_or_default();
            let mut right = right.split(' ');
            let (fstype, superopts) = (right.next().unwrap_or(""), right.nth(1).unwrap_or(""));
            let mount_point = PathBuf::from(unescape(mount_point));
            match fstype {
                "cgroup2" if v2.is_none() => v2 = Some(mount_point),
                "cgroup" => {
                    for opt in superopts.split(',') {
                        if !matches!(opt, "rw" | "ro")
                            && !opt.starts_with("name=")
                            && !opt.contains('=')
                        {
                            controllers.push((opt.to_string(), mount_point.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        match (v2, controllers.is_empty()) {
            (Some(root), true) => CgroupLayout::V2 { root },
            (Some(v2_root), false) => CgroupLayout::Hybrid {
                v2_root,
                controllers,
            },
            (None, false) => CgroupLayout::V1 { controllers },
            (None, true) => CgroupLayout::None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            CgroupLayout::V2 { .. } => "v2",
            CgroupLayout::V1 { .. } => "v1",
            CgroupLayout::Hybrid { .. } => "hybrid",
            CgroupLayout::None => "none",
        }
    }

    /// Where the v2 tree is, if there is one: cgroup ids in events are inodes in it.
    pub fn v2_root(&self) -> Option<&PathBuf> {
        match self {
            CgroupLayout::V2 { root } => Some(root),
            CgroupLayout::Hybrid { v2_root, .. } => Some(v2_root),
            _ => None,
        }
    }

    /// Where a v1 controller (e.g. "memory", "cpu") is mounted.
    pub fn v1_controller(&self, name: &str) -> Option<&PathBuf> {
        match self {
            CgroupLayout::V1 { controllers } | CgroupLayout::Hybrid { controllers, .. } => {
                controllers.iter().find(|(c, _)| c == name).map(|(_, p)| p)
            }
            _ => None,
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
/// Works on bytes: a path's UTF-8 stays intact, and an escape above `\377`
/// (not one the kernel writes) stays as it is.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from this project's test machine (hybrid).
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    // Recorded from a Debian 12 node (pure v2).
    const V2: &str = "\
25 23 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    // Recorded from a CentOS 7 node (v1 with merged cpu,cpuacct).
    const V1: &str = "\
24 18 0:20 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
25 24 0:21 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,xattr,release_agent=/usr/lib/systemd/systemd-cgroups-agent,name=systemd
28 24 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
30 24 0:26 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
";

    #[test]
    fn tells_the_three_layouts_apart() {
        let h = CgroupLayout::from_mountinfo(HYBRID);
        assert_eq!(h.name(), "hybrid");
        assert_eq!(
            h.v2_root().unwrap(),
            &PathBuf::from("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            h.v1_controller("memory").unwrap(),
            &PathBuf::from("/sys/fs/cgroup/memory")
        );
        assert!(h.v1_controller("systemd").is_none());

        let v2 = CgroupLayout::from_mountinfo(V2);
        assert_eq!(
            v2,
            CgroupLayout::V2 {
                root: "/sys/fs/cgroup".into()
            }
        );

        let v1 = CgroupLayout::from_mountinfo(V1);
        assert_eq!(v1.name(), "v1");
        assert_eq!(
            v1.v1_controller("cpuacct").unwrap(),
            &PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert!(v1.v2_root().is_none());

        assert_eq!(CgroupLayout::from_mountinfo(""), CgroupLayout::None);
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/x\\"), "/x\\");
        // Regressions from the mountinfo fuzz target: an escape above \377
        // overflowed a u8; non-ASCII paths were read byte by byte as Latin-1.
        assert_eq!(unescape("/a\\444b"), "/a\\444b");
        assert_eq!(unescape("/données\\011x"), "/données\tx");
        let crash = b":2 \0\0 \\4444\x01ime \xa5/\x1e\0\xff'f123";
        let _ = CgroupLayout::from_mountinfo(&String::from_utf8_lossy(crash));
    }
}
