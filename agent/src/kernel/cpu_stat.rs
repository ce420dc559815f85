//! A cgroup's CPU bandwidth files, the kernel's own view of throttling:
//! `cpu.stat` (periods, throttled periods and time), the quota and period in
//! force, and the usage. cgroup v2 keeps them in the cgroup's own directory
//! (`cpu.stat`, `cpu.max`); v1 in the cpu controller's hierarchy
//! (`cpu.stat`, `cpu.cfs_quota_us`, `cpu.cfs_period_us`) and the usage in
//! cpuacct's (`cpuacct.usage`). On hybrid nodes (v1 controllers beside a v2
//! tree, as kubelet's cgroupfs driver makes them) a container's v1
//! directories have the same path relative to each root as its v2
//! directory, which is how a v2 cgroup id found in an event leads here.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use super::cgroups::CgroupLayout;

/// What the kernel says about one cgroup's CPU bandwidth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CpuStat {
    /// Enforcement periods that had runnable work (`nr_periods`).
    pub periods: u64,
    /// Periods at whose end the group was throttled (`nr_throttled`).
    pub throttled_periods: u64,
    /// Total throttled time, summed over CPUs (`throttled_time` ns in v1,
    /// `throttled_usec` in v2), in ns.
    pub throttled_ns: u64,
    /// CPU time used, ns (v2 `usage_usec`, v1 `cpuacct.usage`); None when unreadable.
    pub usage_ns: Option<u64>,
    /// The quota in force as cores (quota / period); None: no limit.
    pub limit_cores: Option<f64>,
    /// The enforcement period.
    #[serde(skip)]
    pub period: Duration,
}

/// Where one cgroup's CPU files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuFiles {
    /// cgroup v2: everything in the cgroup's directory.
    V2 { dir: PathBuf },
    /// cgroup v1 (also hybrid): the cpu controller's directory, and cpuacct's.
    V1 {
        cpu: PathBuf,
        cpuacct: Option<PathBuf>,
    },
}

impl CpuFiles {
    /// The files of the cgroup at `rel` (relative to the v2 root, e.g.
    /// `/kubepods/burstable/pod…/<id>`), or None when no hierarchy has the
    /// cpu controller.
    pub fn locate(layout: &CgroupLayout, rel: &str) -> Option<CpuFiles> {
        let rel = rel.trim_start_matches('/');
        match layout {
            CgroupLayout::V2 { root } => Some(CpuFiles::V2 {
                dir: root.join(rel),
            }),
            CgroupLayout::V1 { .. } | CgroupLayout::Hybrid { .. } => {
                let cpu = layout.v1_controller("cpu")?.join(rel);
                let cpuacct = layout.v1_controller("cpuacct").map(|p| p.join(rel));
                Some(CpuFiles::V1 { cpu, cpuacct })
            }
            CgroupLayout::None => None,
        }
    }

    /// The directory whose `cpu.stat` holds the throttling counters.
    pub fn stat_dir(&self) -> &Path {
        match self {
            CpuFiles::V2 { dir } => dir,
            CpuFiles::V1 { cpu, .. } => cpu,
        }
    }

    pub fn read(&self) -> io::Result<CpuStat> {
        match self {
            CpuFiles::V2 { dir } => {
                let mut s = parse_stat(&fs::read_to_string(dir.join("cpu.stat"))?, true);
                // No cpu.max in the root or without the cpu controller enabled.
                if let Ok(max) = fs::read_to_string(dir.join("cpu.max")) {
                    (s.limit_cores, s.period) = parse_cpu_max(&max);
                }
                Ok(s)
            }
            CpuFiles::V1 { cpu, cpuacct } => {
                let mut s = parse_stat(&fs::read_to_string(cpu.join("cpu.stat"))?, false);
                let num = |f: &str| -> Option<i64> {
                    fs::read_to_string(cpu.join(f)).ok()?.trim().parse().ok()
                };
                let (quota, period) = (num("cpu.cfs_quota_us"), num("cpu.cfs_period_us"));
                if let (Some(q), Some(p)) = (quota, period) {
                    (s.limit_cores, s.period) = quota_cores(q, p);
                }
                s.usage_ns = cpuacct.as_ref().and_then(|d| {
                    fs::read_to_string(d.join("cpuacct.usage"))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()
                });
                Ok(s)
            }
        }
    }
}

/// `cpu.stat`: v1 has `throttled_time` in ns, v2 `throttled_usec` and `usage_usec`.
pub fn parse_stat(text: &str, v2: bool) -> CpuStat {
    let mut s = CpuStat::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(' ') else {
            continue;
        };
        let Ok(v) = v.trim().parse::<u64>() else {
            continue;
        };
        match k {
            "nr_periods" => s.periods = v,
            "nr_throttled" => s.throttled_periods = v,
            "throttled_time" if !v2 => s.throttled_ns = v,
            "throttled_usec" if v2 => s.throttled_ns = v.saturating_mul(1000),
            "usage_usec" if v2 => s.usage_ns = Some(v.saturating_mul(1000)),
            _ => {}
        }
    }
    s
}

/// v2 `cpu.max`: `"max 100000"` or `"20000 100000"` (µs).
pub fn parse_cpu_max(text: &str) -> (Option<f64>, Duration) {
    let mut it = text.split_whitespace();
    let quota = it.next().unwrap_or("max");
    let period: i64 = it.next().and_then(|p| p.parse().ok()).unwrap_or(100_000);
    quota_cores(quota.parse().unwrap_or(-1), period)
}

/// A quota and period in µs (v1 writes -1 for no quota) as cores.
fn quota_cores(quota_us: i64, period_us: i64) -> (Option<f64>, Duration) {
    let period = Duration::from_micros(period_us.max(0) as u64);
    let cores = (quota_us > 0 && period_us > 0).then(|| quota_us as f64 / period_us as f64);
    (cores, period)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded: a v1 cpu.stat (6.18, this project's hybrid test machine) and
    // a v2 cpu.stat (Debian 12, 6.1).
    const V1_STAT: &str =
        "nr_periods 31\nnr_throttled 30\nthrottled_time 2412345678\nnr_bursts 0\nburst_time 0\n";
    const V2_STAT: &str = "usage_usec 612000\nuser_usec 600000\nsystem_usec 12000\nnr_periods 31\nnr_throttled 30\nthrottled_usec 2412345\nnr_bursts 0\nburst_usec 0\n";

    #[test]
    fn reads_both_cpu_stat_formats() {
        let v1 = parse_stat(V1_STAT, false);
        assert_eq!(
            (v1.periods, v1.throttled_periods, v1.throttled_ns),
            (31, 30, 2_412_345_678)
        );
        assert_eq!(v1.usage_ns, None);
        let v2 = parse_stat(V2_STAT, true);
        assert_eq!(
            (v2.periods, v2.throttled_periods, v2.throttled_ns),
            (31, 30, 2_412_345_000)
        );
        assert_eq!(v2.usage_ns, Some(612_000_000));
    }

    #[test]
    fn reads_quotas() {
        assert_eq!(
            parse_cpu_max("20000 100000\n"),
            (Some(0.2), Duration::from_millis(100))
        );
        assert_eq!(
            parse_cpu_max("max 100000\n"),
            (None, Duration::from_millis(100))
        );
        assert_eq!(quota_cores(-1, 100_000).0, None);
        assert_eq!(quota_cores(150_000, 100_000).0, Some(1.5));
    }

    #[test]
    fn finds_the_files_in_each_layout() {
        let rel = "/kubepods/burstable/podabc/0123";
        let hybrid = CgroupLayout::Hybrid {
            v2_root: "/sys/fs/cgroup/unified".into(),
            controllers: vec![
                ("cpu".into(), "/sys/fs/cgroup/cpu".into()),
                ("cpuacct".into(), "/sys/fs/cgroup/cpuacct".into()),
            ],
        };
        assert_eq!(
            CpuFiles::locate(&hybrid, rel),
            Some(CpuFiles::V1 {
                cpu: "/sys/fs/cgroup/cpu/kubepods/burstable/podabc/0123".into(),
                cpuacct: Some("/sys/fs/cgroup/cpuacct/kubepods/burstable/podabc/0123".into()),
            })
        );
        // Merged cpu,cpuacct (CentOS 7 and most v1 nodes).
        let v1 = CgroupLayout::V1 {
            controllers: vec![
                ("cpu".into(), "/sys/fs/cgroup/cpu,cpuacct".into()),
                ("cpuacct".into(), "/sys/fs/cgroup/cpu,cpuacct".into()),
            ],
        };
        assert_eq!(
            CpuFiles::locate(&v1, rel).unwrap().stat_dir(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/kubepods/burstable/podabc/0123")
        );
        let v2 = CgroupLayout::V2 {
            root: "/sys/fs/cgroup".into(),
        };
        assert_eq!(
            CpuFiles::locate(&v2, rel),
            Some(CpuFiles::V2 {
                dir: "/sys/fs/cgroup/kubepods/burstable/podabc/0123".into()
            })
        );
        assert_eq!(CpuFiles::locate(&CgroupLayout::None, rel), None);
    }

    #[test]
    fn reads_a_recorded_v2_directory() {
        let dir = std::env::temp_dir().join(format!("podscope-cpustat-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cpu.stat"), V2_STAT).unwrap();
        fs::write(dir.join("cpu.max"), "20000 100000\n").unwrap();
        let s = CpuFiles::V2 { dir: dir.clone() }.read().unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(s.throttled_periods, 30);
        assert_eq!(s.limit_cores, Some(0.2));
        assert_eq!(s.period, Duration::from_millis(100));
    }
}
