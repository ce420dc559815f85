//! `cargo xtask bench probes`: what kubelet-style probes cost the agent.
//!
//! The same pods on the test node twice, in one run, side by side: first
//! without probes, then each with an exec liveness probe (`cat`, through
//! CRI ExecSync: a runtime exec into the container) and an httpGet readiness
//! probe (a connection from the node to the pod's busybox httpd), both every
//! second. For each phase: the agent's CPU, the events per second it
//! publishes (its `/api/v1/events` stream, counted), and in the probed phase
//! how many probes actually ran as the agent saw them (exec'd `cat` exits,
//! connections to the pods' port 8080): on 2 CPUs the node itself (runc
//! exec) may not keep up with 100 execs a second, so the probe rate is
//! measured, never assumed. The extra work per probe is the CPU difference
//! divided by the probes seen.
//!
//! `PODSCOPE_BENCH_PROBE_PODS` (default 100) sets the number of pods.

use std::{
    io::BufRead,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{BenchNode, daemon::BenchAgent, proc_cpu};
use crate::{build_podscope, setup};

const NS: &str = "podscope-bench-probes";
const WINDOW: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(8);

/// One phase's pods: `plain` without probes, `probed` with both.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Plain,
    Probed,
}

impl Phase {
    fn prefix(self) -> &'static str {
        match self {
            Phase::Plain => "plain",
            Phase::Probed => "probed",
        }
    }
}

/// `pods` pods of the phase, each one container: busybox httpd as PID 1
/// (the node's own image: the smallest container there is here).
fn fill(node: &mut BenchNode, phase: Phase, pods: usize) -> Result<Duration> {
    let t = Instant::now();
    let probes = match phase {
        Phase::Plain => "",
        // A high failure threshold: an overloaded node must not turn the
        // benchmark into a restart storm.
        Phase::Probed => {
            "    livenessProbe: {exec: {command: [cat, /www/healthz]}, periodSeconds: 1, timeoutSeconds: 10, failureThreshold: 1000}\n    readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 1, timeoutSeconds: 5}\n"
        }
    };
    for i in 0..pods {
        let name = format!("{}-{i}", phase.prefix());
        node.apply(
            &format!("{NS}/{name}"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: web\n    command: [sh, -c, \"mkdir -p /www && echo ok > /www/healthz && exec httpd -f -p 8080 -h /www\"]\n    ports: [{{containerPort: 8080}}]\n{probes}"
            ),
        )?;
    }
    node.wait_running(NS, phase.prefix(), pods, Duration::from_secs(600))?;
    Ok(t.elapsed())
}

/// Counts of one `/api/v1/events` reader.
#[derive(Default)]
struct Counts {
    events: AtomicU64,
    exec_probes: AtomicU64,
    http_probes: AtomicU64,
}

/// Reads the agent's event stream until the connection is shut down.
fn read_stream(agent: &BenchAgent) -> Result<(Arc<Counts>, std::os::unix::net::UnixStream)> {
    let s = agent.events()?;
    let closer = s.try_clone()?;
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(s).lines() {
            let Ok(l) = line else { break };
            if !l.starts_with('{') {
                continue;
            }
            c.events.fetch_add(1, Ordering::Relaxed);
            // The exec probe's `cat`, and the node's connections to port 8080.
            if l.starts_with("{\"kind\":\"exit\"") && l.contains("\"comm\":\"cat\"") {
                c.exec_probes.fetch_add(1, Ordering::Relaxed);
            } else if l.starts_with("{\"kind\":\"connection\"") && l.contains(":8080\"") {
                c.http_probes.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok((counts, closer))
}

/// One phase's measurement.
struct Measured {
    cpu: Duration,
    seconds: f64,
    events: u64,
    exec_probes: u64,
    http_probes: u64,
}

fn measure(agent_pid: u32, counts: &Counts) -> Measured {
    let snap = |c: &Counts| {
        (
            c.events.load(Ordering::Relaxed),
            c.exec_probes.load(Ordering::Relaxed),
            c.http_probes.load(Ordering::Relaxed),
        )
    };
    let (e0, x0, h0) = snap(counts);
    let (cpu0, t0) = (proc_cpu(agent_pid).unwrap_or_default(), Instant::now());
    std::thread::sleep(WINDOW);
    let cpu = proc_cpu(agent_pid).unwrap_or_default().saturating_sub(cpu0);
    let seconds = t0.elapsed().as_secs_f64();
    let (e1, x1, h1) = snap(counts);
    Measured {
        cpu,
        seconds,
        events: e1 - e0,
        exec_probes: x1 - x0,
        http_probes: h1 - h0,
    }
}

pub fn run() -> Result<ExitCode> {
    setup::run()?;
    let pods = super::env_count("PODSCOPE_BENCH_PROBE_PODS", 100);
    let podscope = build_podscope()?;
    let mut node = BenchNode::up()?;
    let agent = BenchAgent::start(&podscope, "probes")?;
    let result = (|| -> Result<()> {
        let (counts, closer) = read_stream(&agent)?;
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "probes benchmark: {pods} pods (busybox httpd), {cpus} CPUs, {} s windows",
            WINDOW.as_secs()
        );
        let mut phases = vec![];
        for phase in [Phase::Plain, Phase::Probed] {
            let took = fill(&mut node, phase, pods)?;
            std::thread::sleep(SETTLE);
            let m = measure(agent.pid(), &counts);
            let label = match phase {
                Phase::Plain => "without probes",
                Phase::Probed => "with probes (exec + httpGet, every 1 s)",
            };
            println!(
                "  {label}: pods running after {:.1} s; agent CPU {:.2}% of one core, {:.0} events/s{}",
                took.as_secs_f64(),
                m.cpu.as_secs_f64() / m.seconds * 100.0,
                m.events as f64 / m.seconds,
                if phase == Phase::Probed {
                    format!(
                        "; probes seen {:.1}/s exec, {:.1}/s httpGet (asked: {pods}/s each)",
                        m.exec_probes as f64 / m.seconds,
                        m.http_probes as f64 / m.seconds
                    )
                } else {
                    String::new()
                }
            );
            phases.push(m);
            node.clear(NS)?;
        }
        let _ = closer.shutdown(std::net::Shutdown::Both);
        if let [plain, probed] = &phases[..] {
            let per_s = |m: &Measured| m.cpu.as_secs_f64() / m.seconds;
            let probes_per_s = (probed.exec_probes + probed.http_probes) as f64 / probed.seconds;
            let extra = per_s(probed) - per_s(plain);
            if probes_per_s > 0.0 {
                println!(
                    "  extra agent CPU per probe: {:.0} µs ({:+.2}% of one core for {:.1} probes/s)",
                    extra / probes_per_s * 1e6,
                    extra * 100.0,
                    probes_per_s
                );
            } else {
                println!("  no probe was seen: the node ran none (see above)");
            }
        }
        Ok(())
    })();
    drop(agent);
    drop(node);
    result.map(|_| ExitCode::SUCCESS)
}
