//! CPU throttling (the sched_switch probe): a cgroup of the test's own with
//! a 20 ms / 100 ms quota (0.2 cores) and one spinning process must come out
//! throttled with as many throttled periods as the cgroup's own `cpu.stat`
//! counts (±1 for the edges of the window), each throttle ending at its
//! period's refill. No duration is asserted but an outer limit (emulated
//! kernels run slowly): a throttle longer than [`LONGEST_NS`] is a missed close. Hybrid and v1 nodes get the quota in the v1 cpu
//! hierarchy and the process also in a v2 cgroup (events carry v2 ids);
//! pure v2 kernels (the VM guests) enable the cpu controller in the root and
//! put both in one cgroup.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use super::{Context, Stop, Verdict, ensure, fail, helper};
use crate::{
    kernel::{cgroups::CgroupLayout, cpu_stat::CpuFiles},
    probes::{self, KernelOffsets, LoadOptions, throttle::ThrottleProbe},
    throttle::Measured,
};

/// The test cgroup's enforcement period (cpu.cfs_period_us / cpu.max).
const PERIOD: Duration = Duration::from_millis(100);

/// How long the spinner runs: ~30 periods.
const RUN: Duration = Duration::from_secs(3);

/// A throttle ends when the next period (100 ms) refills the quota; longer
/// than 2.5 periods means the probe missed the unthrottle.
const LONGEST_NS: u64 = 250_000_000;

/// The test's cgroup(s), removed on drop.
struct TestCgroup {
    /// Directories the process is moved into (v2 first), removed in reverse.
    dirs: Vec<PathBuf>,
    v2_id: u64,
    files: CpuFiles,
}

impl TestCgroup {
    fn create(layout: &CgroupLayout, name: &str) -> Result<TestCgroup, Stop> {
        let Some(v2_root) = layout.v2_root().cloned() else {
            return Err(Stop::Skip("no cgroup v2 hierarchy is mounted".into()));
        };
        let v2 = v2_root.join(name);
        let mut cg = TestCgroup {
            dirs: vec![],
            v2_id: 0,
            files: CpuFiles::V2 { dir: v2.clone() },
        };
        match layout.v1_controller("cpu").cloned() {
            None => {
                // Pure v2: the cpu controller must be enabled for children of the root.
                let control = v2_root.join("cgroup.subtree_control");
                if let Err(e) = fs::write(&control, "+cpu") {
                    return Err(Stop::Skip(format!(
                        "cannot enable the cpu controller in {}: {e}",
                        control.display()
                    )));
                }
                fs::create_dir(&v2)?;
                cg.dirs.push(v2.clone());
                fs::write(v2.join("cpu.max"), "20000 100000")?;
            }
            Some(cpu_root) => {
                fs::create_dir(&v2)?;
                cg.dirs.push(v2.clone());
                let cpu = cpu_root.join(name);
                fs::create_dir(&cpu)?;
                cg.dirs.push(cpu.clone());
                fs::write(cpu.join("cpu.cfs_period_us"), "100000")?;
                fs::write(cpu.join("cpu.cfs_quota_us"), "20000")?;
                cg.files = CpuFiles::V1 { cpu, cpuacct: None };
            }
        }
        cg.v2_id = fs::metadata(&v2)?.ino();
        Ok(cg)
    }

    fn add(&self, pid: u32) -> std::io::Result<()> {
        for d in &self.dirs {
            fs::write(d.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            // The killed process may take a moment to leave.
            for _ in 0..50 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

struct Spinner(Child);

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn throttled_cgroup_matches_cpu_stat(ctx: &Context) -> Verdict {
    let offsets = KernelOffsets::from_sys_fs()?;
    if let Err(why) = &offsets.throttle {
        return Err(Stop::Skip(format!(
            "this kernel has no CFS bandwidth control in its BTF: {why}"
        )));
    }
    let layout = CgroupLayout::current();
    let cg = TestCgroup::create(
        &layout,
        &format!("podscope-selftest-throttle-{}", std::process::id()),
    )?;
    let mut ebpf = probes::load_object(&offsets, &LoadOptions::default())?;
    let btf = probes::attach_btf();
    let mut probe = ThrottleProbe::attach(&mut ebpf, &btf, &offsets.throttle, None)?;
    drop(btf);

    let spinner = Spinner(
        Command::new(&ctx.helper)
            .args(["--helper", helper::SPIN])
            .spawn()?,
    );
    cg.add(spinner.0.id())?;
    let mut measured = Measured::default();
    let mut durations = vec![];
    let v2_id = cg.v2_id;
    let mut collect = |probe: &mut ThrottleProbe| {
        probe.drain(|t| {
            if t.cgroup_id == v2_id {
                measured.add(&t, Some(PERIOD));
                durations.push(t.duration_ns);
            }
        });
        measured.periods
    };
    let deadline = std::time::Instant::now() + RUN;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        collect(&mut probe);
    }
    drop(spinner);
    // The last throttle ends at the next period boundary at the latest, and
    // its event then reaches the ring: poll until the counts meet (or an
    // outer limit passes; the check below then says by how much they differ).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let kernel = loop {
        let periods = collect(&mut probe);
        let kernel = cg.files.read()?;
        if periods.abs_diff(kernel.throttled_periods) <= 1 || std::time::Instant::now() > deadline {
            break kernel;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stats = probe.stats();
    drop(cg);

    let detail = format!(
        "measured {} periods ({} throttles, {:.0} ms) vs cpu.stat {} throttled of {} ({:.0} ms); lost {}",
        measured.periods,
        measured.throttles,
        measured.throttled_ns as f64 / 1e6,
        kernel.throttled_periods,
        kernel.periods,
        kernel.throttled_ns as f64 / 1e6,
        stats.lost,
    );
    ensure!(
        kernel.throttled_periods >= 10,
        "the spinner was hardly throttled, so nothing is tested: {detail}"
    );
    ensure!(
        measured.ancestor_throttles == 0,
        "the cgroup's own quota throttled it, yet {} throttles were flagged as an ancestor's: {detail}",
        measured.ancestor_throttles
    );
    let diff = measured.periods as i64 - kernel.throttled_periods as i64;
    ensure!(diff.abs() <= 1, "periods differ by {diff}: {detail}");
    durations.sort_unstable();
    let longest = durations.last().copied().unwrap_or(0);
    if durations.first() == Some(&0) || longest > LONGEST_NS {
        fail!(
            "a throttle of {:.1} ms (want more than 0 and within its period): {detail}",
            if longest > LONGEST_NS { longest } else { 0 } as f64 / 1e6
        );
    }
    Ok(format!(
        "{detail}; longest {:.1} ms via {}",
        longest as f64 / 1e6,
        probe.attachment.attach_type
    ))
}
