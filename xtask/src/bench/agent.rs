//! `cargo xtask bench agent`: `podscope agent` on a full test node, then
//! what counting the live heap costs per allocation (benches/heap.rs).

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    daemon::BenchAgent,
    node::{BENCH_PODS, BenchNode},
    tracer::{median, proc_cpu, proc_status_kib, workload},
};
use crate::{build_podscope, cargo, setup, status};

/// A plain HTTP/1.0 GET on loopback, returning the body.
pub(crate) fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    Ok(raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

pub(crate) fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `cargo xtask bench agent`: `podscope agent` on the test node with 100
/// pods: idle CPU and memory, /metrics render time with 300 containers'
/// series, and the events per second it carries to an HTTP stream reader
/// on its API socket; then what counting the heap costs per allocation.
pub fn agent() -> Result<ExitCode> {
    setup::run()?;
    let podscope = build_podscope()?;
    let mut node = BenchNode::up()?;
    let agent = BenchAgent::start(&podscope, "agent")?;
    let port = agent.port;
    let result = (|| -> Result<()> {
        // The pods start under the agent, so every container has exit series.
        let took = node.fill()?;
        println!(
            "agent benchmark: {BENCH_PODS} pods x 3 containers running (after {:.1} s)",
            took.as_secs_f64()
        );
        // Idle: the pods sleep; nothing but the agent's own upkeep runs.
        std::thread::sleep(Duration::from_secs(3));
        let pid = agent.pid();
        let (cpu0, t0) = (proc_cpu(pid).unwrap_or_default(), Instant::now());
        std::thread::sleep(Duration::from_secs(20));
        let idle =
            (proc_cpu(pid).unwrap_or_default() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
        let rss = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
        let hwm = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
        println!(
            "  idle CPU {:.2}% of one core over 20 s; RSS {:.1} MiB (peak {:.1} MiB)",
            idle * 100.0,
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );

        // Scrape time with every container's series present.
        let body = http_get(port, "/metrics")?;
        let series = body
            .lines()
            .filter(|l| l.starts_with("podscope_process_exits_total{"))
            .count();
        let mut times = vec![];
        for _ in 0..50 {
            let t = Instant::now();
            http_get(port, "/metrics")?;
            times.push(t.elapsed());
        }
        let scrape = median(&mut times);
        println!(
            "  /metrics: {series} process_exits series, {} bytes, median {:.2} ms over 50 scrapes (HTTP included)",
            body.len(),
            scrape.as_secs_f64() * 1000.0
        );

        // Throughput: a reader on /api/v1/events (the API's socket) while
        // both cores fork and exit.
        let before = http_get(port, "/metrics")?;
        let reader = {
            use std::io::BufRead;
            let s = agent.events()?;
            let closer = s.try_clone()?;
            let handle = std::thread::spawn(move || {
                let mut n = 0u64;
                for line in std::io::BufReader::new(s).lines() {
                    match line {
                        Ok(l) if l.starts_with("{\"kind\":\"exit\"") => n += 1,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                n
            });
            (handle, closer)
        };
        std::thread::sleep(Duration::from_millis(300));
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(2);
        let n = 40_000;
        let t = Instant::now();
        workload("process", n, workers)?;
        let storm = t.elapsed();
        // Let the last batch through (the agent drains every 100 ms), then hang up.
        std::thread::sleep(Duration::from_millis(1500));
        let _ = reader.1.shutdown(std::net::Shutdown::Both);
        let received = reader
            .0
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?;
        let after = http_get(port, "/metrics")?;
        let delta = |name: &str| metric_sum(&after, name) - metric_sum(&before, name);
        println!(
            "  stream: {n} fork+exit on {workers} workers in {:.2} s ({:.0} exits/s); the reader received {received} exit events; kernel lost {}, stream dropped {}",
            storm.as_secs_f64(),
            n as f64 / storm.as_secs_f64(),
            delta("podscope_events_lost_total"),
            delta("podscope_stream_events_dropped_total")
        );
        Ok(())
    })();
    drop(agent);
    drop(node);
    result?;
    heap_counting()?;
    Ok(ExitCode::SUCCESS)
}

/// benches/heap.rs on the test build's allocator (glibc) and on the one
/// the shipped binary links (musl): what counting the live heap adds to an
/// allocation and its free.
fn heap_counting() -> Result<()> {
    println!("\nheap counting (benches/heap.rs), glibc (the test build):");
    status(cargo().args(["bench", "--quiet", "-p", "podscope", "--bench", "heap"]))?;
    if let Some(arch) = crate::arch::Arch::host() {
        println!("heap counting, musl (the shipped binary's allocator):");
        let (var, cc) = arch.c_compiler();
        status(
            cargo()
                .env(var, cc)
                .args(["bench", "--quiet", "-p", "podscope", "--bench", "heap"])
                .args(["--target", arch.musl_target()]),
        )?;
    }
    Ok(())
}
