//! `cargo xtask bench runtime-report`: what waiting for the runtime's
//! report of a container's end (what kubectl shows) costs the termination
//! records, side by side in one run.
//!
//! Two agents watch the same test node at once: one asks CRI (each record
//! waits for the runtime's ContainerStatus of the end, up to 3 s), the
//! other runs with `--no-cri` (nothing to wait for). Pods whose single
//! container exits with status 3 after half a second give one record each;
//! each agent's `/api/v1/events` stream is read, and a record's delay is
//! from the arrival of its main process's exit event to the arrival of the
//! record. Both see the same exits, so the difference is the wait.
//!
//! `PODSCOPE_BENCH_REPORT_PODS` (default 30) sets the number of pods.

use std::{
    collections::HashMap,
    io::BufRead,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::{BenchNode, daemon::BenchAgent, median, proc_cpu};
use crate::{build_podscope, setup};

const NS: &str = "podscope-bench-report";

/// What one agent's stream showed.
#[derive(Default)]
struct Seen {
    /// Main process pid → when its exit event arrived.
    exits: HashMap<u64, Instant>,
    /// Exit → record, per record whose exit was seen.
    delays: Vec<Duration>,
    /// Records carrying the runtime's report.
    reported: usize,
    records: usize,
}

/// Reads an agent's event stream until the connection is shut down.
fn read_stream(agent: &BenchAgent) -> Result<(Arc<Mutex<Seen>>, std::os::unix::net::UnixStream)> {
    let s = agent.events()?;
    let closer = s.try_clone()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let out = seen.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(s).lines() {
            let Ok(l) = line else { break };
            let at = Instant::now();
            if !l.starts_with('{') {
                continue;
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) else {
                continue;
            };
            let Ok(mut seen) = out.lock() else { break };
            match v["kind"].as_str() {
                Some("exit") if v["thread"] == false => {
                    if let Some(pid) = v["tgid"].as_u64() {
                        seen.exits.insert(pid, at);
                    }
                }
                // Ours: `sh` exiting with 3 (the agent without CRI has no
                // namespace to tell them by).
                Some("termination") if v["comm"] == "sh" && v["exit_code"] == 3 => {
                    seen.records += 1;
                    seen.reported += usize::from(v["runtime_reported"].is_object());
                    if let Some(exit) = v["pid"].as_u64().and_then(|p| seen.exits.get(&p).copied())
                    {
                        seen.delays.push(at.saturating_duration_since(exit));
                    }
                }
                _ => {}
            }
        }
    });
    Ok((seen, closer))
}

pub fn run() -> Result<ExitCode> {
    setup::run()?;
    let pods = super::env_count("PODSCOPE_BENCH_REPORT_PODS", 30);
    let podscope = build_podscope()?;
    let mut node = BenchNode::up()?;
    let with = BenchAgent::start(&podscope, "report-cri")?;
    let without = BenchAgent::start_with(&podscope, "report-nocri", &[], &["--no-cri"])?;
    let result = (|| -> Result<()> {
        let (seen_with, close_with) = read_stream(&with)?;
        let (seen_without, close_without) = read_stream(&without)?;
        let cpu0 = (
            proc_cpu(with.pid()).unwrap_or_default(),
            proc_cpu(without.pid()).unwrap_or_default(),
        );
        println!(
            "runtime-report benchmark: {pods} pods, each a container that exits with 3 after 0.5 s; two agents side by side"
        );
        for i in 0..pods {
            let name = format!("ends-{i}");
            node.apply(
                &format!("{NS}/{name}"),
                &format!(
                    "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: app\n    command: [sh, -c, \"sleep 0.5; exit 3\"]\n"
                ),
            )?;
        }
        // Every record, of both agents (the CRI one may wait up to 3 s).
        let deadline = Instant::now() + Duration::from_secs(120);
        let count = |s: &Arc<Mutex<Seen>>| s.lock().map_or(0, |s| s.records);
        while count(&seen_with) < pods || count(&seen_without) < pods {
            if Instant::now() > deadline {
                bail!(
                    "records after 120 s: {} with CRI, {} without, of {pods}",
                    count(&seen_with),
                    count(&seen_without)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let cpu = (
            proc_cpu(with.pid())
                .unwrap_or_default()
                .saturating_sub(cpu0.0),
            proc_cpu(without.pid())
                .unwrap_or_default()
                .saturating_sub(cpu0.1),
        );
        let _ = close_with.shutdown(std::net::Shutdown::Both);
        let _ = close_without.shutdown(std::net::Shutdown::Both);
        let summary = |label: &str, s: &Arc<Mutex<Seen>>, cpu: Duration| -> Option<f64> {
            let s = s.lock().ok()?;
            let mut d = s.delays.clone();
            if d.is_empty() {
                println!(
                    "  {label}: {} records, no exit event seen before one",
                    s.records
                );
                return None;
            }
            let ms = |x: Duration| x.as_secs_f64() * 1000.0;
            let med = ms(median(&mut d));
            println!(
                "  {label}: {} records, {} with the runtime's report; exit → record median {med:.0} ms, max {:.0} ms; agent CPU {:.0} ms over the run",
                s.records,
                s.reported,
                d.last().map_or(0.0, |x| ms(*x)),
                cpu.as_secs_f64() * 1000.0
            );
            Some(med)
        };
        let a = summary("with CRI (waits for the report)", &seen_with, cpu.0);
        let b = summary("--no-cri (nothing to wait for)", &seen_without, cpu.1);
        if let (Some(a), Some(b)) = (a, b) {
            println!(
                "  the wait adds {:.0} ms to a record's median delay ({:.2}×)",
                a - b,
                a / b.max(1.0)
            );
        }
        node.clear(NS)?;
        Ok(())
    })();
    drop(with);
    drop(without);
    drop(node);
    result.map(|()| ExitCode::SUCCESS)
}
