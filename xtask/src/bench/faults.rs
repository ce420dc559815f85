//! `cargo xtask bench faults`: the agent under each fault of an outside
//! dependency, with a 20,000-process exit storm running through the probes
//! meanwhile, all in one run. Per fault: `/healthz` worst and p99 answer
//! time (asked every 20 ms), the storm's exits lost (in the kernel or by
//! the event stream), the drain lag the agent reports, and how long the
//! storm took against the same storm under the agent without a fault.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{BenchNode, daemon::BenchAgent, http_get, metric_sum, workload};
use crate::{build_podscope, setup};

const STORM: u32 = 20_000;

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    HangingRules,
    FrozenContainerd,
    HalfSentRequests,
    SlowReader,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "no fault",
            Fault::HangingRules => "iptables-save hangs",
            Fault::FrozenContainerd => "containerd SIGSTOPped",
            Fault::HalfSentRequests => "200 half-sent requests",
            Fault::SlowReader => "slow /api/v1/events reader",
        }
    }
}

struct Row {
    fault: Fault,
    worst: Duration,
    p99: Duration,
    failed: usize,
    lost: f64,
    lag: f64,
    storm: Duration,
}

pub fn run() -> Result<std::process::ExitCode> {
    setup::run()?;
    let podscope = build_podscope()?;
    let _node = BenchNode::up()?;
    let containerd: i32 = std::fs::read_to_string("/run/podscope-node/containerd.pid")?
        .trim()
        .parse()?;
    let tools = std::env::temp_dir().join(format!("podscope-bench-faults-{}", std::process::id()));
    std::fs::create_dir_all(&tools)?;
    hanging_tools(&tools)?;
    // Warm-up, then the storm without any agent: the reference.
    workload("process", 2_000, 2)?;
    let bare = workload("process", STORM, 2)?;
    let mut rows = vec![];
    for fault in [
        Fault::None,
        Fault::HangingRules,
        Fault::FrozenContainerd,
        Fault::HalfSentRequests,
        Fault::SlowReader,
    ] {
        rows.push(one(fault, &podscope, &tools, containerd)?);
    }
    let _ = std::fs::remove_dir_all(&tools);
    let reference = rows[0].storm.as_secs_f64();
    println!(
        "\nfaults benchmark: {STORM}-process storm (2 workers) under `podscope agent`; storm without any agent {:.2} s",
        bare.as_secs_f64()
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8} {:>10} {:>12} {:>10} {:>14}",
        "fault",
        "healthz max",
        "healthz p99",
        "failed",
        "lost",
        "drain lag",
        "storm",
        "vs no fault"
    );
    for r in &rows {
        println!(
            "{:<28} {:>10.1}ms {:>10.1}ms {:>8} {:>10} {:>10.0}ms {:>9.2}s {:>13.2}x",
            r.fault.name(),
            r.worst.as_secs_f64() * 1000.0,
            r.p99.as_secs_f64() * 1000.0,
            r.failed,
            r.lost,
            r.lag * 1000.0,
            r.storm.as_secs_f64(),
            r.storm.as_secs_f64() / reference
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// A fake `iptables-save` (every backend) that never finishes.
fn hanging_tools(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for tool in ["iptables-save", "iptables-nft-save", "iptables-legacy-save"] {
        let p = dir.join(tool);
        std::fs::write(&p, "#!/bin/sh\nexec sleep 3600\n")?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Resumes containerd whatever happens.
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        // SAFETY: SIGCONT to the test node's containerd.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

fn one(fault: Fault, podscope: &Path, tools: &Path, containerd: i32) -> Result<Row> {
    let env = if fault == Fault::HangingRules {
        vec![(
            "PATH",
            format!(
                "{}:{}",
                tools.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )]
    } else {
        vec![]
    };
    let agent = BenchAgent::start_with_env(podscope, "faults", &env)?;
    let port = agent.port;
    let mut held: Vec<TcpStream> = vec![];
    let mut _thaw = None;
    let stop = Arc::new(AtomicBool::new(false));
    let mut slow = None;
    match fault {
        Fault::FrozenContainerd => {
            // SAFETY: SIGSTOP to the test node's containerd; Thaw resumes it.
            unsafe { libc::kill(containerd, libc::SIGSTOP) };
            _thaw = Some(Thaw(containerd));
        }
        Fault::HalfSentRequests => {
            for _ in 0..200 {
                let mut s = TcpStream::connect(("127.0.0.1", port))?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")?;
                held.push(s);
            }
        }
        Fault::SlowReader => {
            // The stream is on the API's socket.
            let mut s = agent.events()?;
            let st = stop.clone();
            slow = Some(std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while !st.load(Ordering::Relaxed) && s.read(&mut buf).unwrap_or(0) > 0 {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }));
        }
        _ => {}
    }
    let before = http_get(port, "/metrics")?;
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut times, mut failed, mut lag) = (vec![], 0usize, 0f64);
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match healthz(port) {
                    true => times.push(t.elapsed()),
                    false => failed += 1,
                }
                n += 1;
                if n.is_multiple_of(25)
                    && let Ok(m) = http_get(port, "/metrics")
                {
                    lag = lag.max(metric_sum(&m, "podscope_drain_lag_seconds"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (times, failed, lag)
        })
    };
    let storm = workload("process", STORM, 2)?;
    // Let the agent publish what the storm produced.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (mut times, failed, lag) = sampler.join().map_err(|_| anyhow::anyhow!("sampler"))?;
    if let Some(t) = slow {
        let _ = t.join();
    }
    let after = http_get(port, "/metrics")?;
    let delta = |name: &str| metric_sum(&after, name) - metric_sum(&before, name);
    let lost = delta("podscope_events_lost_total{source=\"exits\"}")
        + delta("podscope_stream_events_dropped_total");
    times.sort();
    let worst = times.last().copied().unwrap_or_default();
    let p99 = times
        .get(times.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or_default();
    drop(held);
    drop(agent);
    Ok(Row {
        fault,
        worst,
        p99,
        failed,
        lost,
        lag,
        storm,
    })
}

fn healthz(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains(" 200 ")
}
