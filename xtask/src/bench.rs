//! `cargo xtask bench <capability>`: overhead measured side by side, in one
//! run, as ratios. Rounds alternate the conditions so that drift of the
//! machine (other load, CPU frequency) spreads over all of them alike.
//! One module per capability; `tracer` holds what the tracer benchmarks
//! share, `node` the full test node, `storm` the workloads.

use std::process::ExitCode;

use anyhow::{Result, bail};

mod agent;
mod daemon;
mod exits;
mod faults;
mod net;
mod node;
mod peers;
mod pods;
mod probes;
mod rules;
mod runtime_report;
mod soak;
mod storm;
mod terminations;
mod throttle;
mod tracer;

// The names the capability modules share, at the root so that each can say
// `super::name`.
use agent::{http_get, metric_sum};
use node::BenchNode;
pub use storm::{pingpong, storm};
use tracer::{median, proc_cpu, workload};

/// The test suite's soak (`cargo xtask test`): the verdicts of its checks,
/// run with the agent `cargo test` just built.
pub fn soak_check() -> Result<Vec<(&'static str, Result<(), String>)>> {
    soak::check(&crate::root().join("target/release/podscope"))
}

/// A size a benchmark takes from the environment (`PODSCOPE_BENCH_…`), or its default.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn run(args: &[String]) -> Result<ExitCode> {
    match args.first().map(String::as_str) {
        Some("exits") => exits::exits(),
        Some("pods") => pods::pods(),
        Some("agent") => agent::agent(),
        Some("terminations") => terminations::terminations(),
        Some("net") => net::run(),
        Some("rules") => rules::standalone(),
        Some("throttle") => throttle::throttle(),
        Some("faults") => faults::run(),
        Some("peers") => peers::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("probes") => probes::run(),
        Some("runtime-report") => runtime_report::run(),
        _ => {
            bail!(
                "usage: cargo xtask bench <exits | pods | agent | terminations | net | rules | throttle | faults | peers [--baseline PODSCOPE] [--shipped] [FAMILY...] | probes | runtime-report | soak [--minutes N] [--records-memory-bytes B] [--shipped]>"
            )
        }
    }
}
