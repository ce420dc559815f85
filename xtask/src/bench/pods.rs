//! `cargo xtask bench pods`: what attribution costs with 100 pods × 3
//! containers on the test node.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, ExitCode, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::{
    node::{BENCH_PODS, BenchNode},
    tracer::proc_status_kib,
};
use crate::{NODE_SOCKET, build_podscope, setup};

/// `cargo xtask bench pods`: what attribution costs with 100 pods × 3
/// containers on the test node: the resolver's time per event, and the
/// tracer's resident memory with those pods against an empty node.
pub fn pods() -> Result<ExitCode> {
    setup::run()?;
    let podscope = build_podscope()?;
    let mut node = BenchNode::up()?;
    let rss_empty = tracer_rss(&podscope)?;
    println!("pods benchmark: {BENCH_PODS} pods x 3 containers on the test node");
    let took = node.fill()?;
    println!(
        "  {} containers running after {:.1} s",
        BENCH_PODS * 3,
        took.as_secs_f64()
    );
    let rss_full = tracer_rss(&podscope)?;
    let out = Command::new(crate::cargo().get_program())
        .current_dir(crate::root())
        .args([
            "bench",
            "-q",
            "-p",
            "podscope",
            "--bench",
            "attribution",
            "--",
            "--cri-socket",
            NODE_SOCKET,
        ])
        .output()?;
    drop(node);
    if !out.status.success() {
        bail!(
            "the attribution bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    println!(
        "  tracer RSS (podscope trace exits, steady): {:.1} MiB on an empty node, {:.1} MiB with {} containers: {:+.1} MiB",
        rss_empty as f64 / 1024.0,
        rss_full as f64 / 1024.0,
        BENCH_PODS * 3,
        (rss_full as f64 - rss_empty as f64) / 1024.0
    );
    Ok(ExitCode::SUCCESS)
}

/// Steady resident memory of `podscope trace exits` attached to the test node.
fn tracer_rss(podscope: &Path) -> Result<u64> {
    let mut child = Command::new(podscope)
        .args([
            "trace",
            "exits",
            "-o",
            "json",
            "--cri-socket",
            NODE_SOCKET,
            "--log",
            "podscope=debug",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("attached") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .context("podscope did not attach")?;
    // Let a resolver tick (and a CRI refresh) pass.
    std::thread::sleep(Duration::from_secs(3));
    let rss = proc_status_kib(child.id(), "VmRSS:").unwrap_or(0);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    Ok(rss)
}
