//! `cargo xtask fuzz [--seconds N] [TARGET]...` (or `--smoke`, the test
//! command's brief run of every target): builds the cargo-fuzz
//! targets of `fuzz/` (every parser of input from outside podscope) and runs
//! each for N seconds (default 60), starting from its committed corpus
//! `fuzz/corpus/<target>/`. New inputs go to a scratch corpus under
//! `target/fuzz-corpus/`, so a run never rewrites the committed one; a
//! crash leaves its input in `fuzz/artifacts/<target>/` and fails the task
//! (turn it into a regression test, fix it, and add it to the corpus).
//!
//! The build is one `cargo build` of all targets with libFuzzer's coverage
//! instrumentation (the flags cargo-fuzz passes, set here so that no tool
//! has to be installed for it), without a sanitizer: podscope's parsers are
//! safe Rust, and overflow checks and debug assertions, which stay on, are
//! what finds their bugs. It uses the `fuzz` profile (Cargo.toml): opt-level
//! 1 with the default codegen units, because cargo-fuzz's single codegen
//! unit at opt-level 3 made this build the longest step of the test command
//! while the smoke run executes each target for a few seconds only.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{root, status};

/// Every target, in the order they run (fuzz/Cargo.toml lists the same).
pub const TARGETS: &[&str] = &[
    "iptables_save",
    "nft_json",
    "journal_frames",
    "btf",
    "cgroup_path",
    "conntrack_netlink",
    "tracefs_format",
    "mountinfo",
    "cpu_stat",
    "event_decoders",
    "http_router",
];

const TRIPLE: &str = "x86_64-unknown-linux-gnu";
const PROFILE: &str = "fuzz";
/// The fuzz build's own target directory (its flags differ from every other build's).
const TARGET_DIR: &str = "target/fuzz";

pub struct Run {
    pub target: &'static str,
    pub runs: u64,
    pub corpus: u64,
    pub seconds: f64,
}

/// `cargo xtask fuzz` as called from the command line.
pub fn run(args: &[String]) -> Result<std::process::ExitCode> {
    let mut seconds = 60u64;
    let mut chosen = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            // What the test command runs: every target, 60 s in all.
            "--smoke" => {
                let (passed, failed) = smoke(60)?;
                println!("fuzz smoke run: {passed} targets without a crash, {failed} with one");
                return Ok(if failed == 0 {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::FAILURE
                });
            }
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .context("--seconds needs a whole number of seconds")?;
            }
            t => match TARGETS.iter().find(|k| **k == t) {
                Some(k) => chosen.push(*k),
                None => bail!(
                    "no fuzz target `{t}`; the targets are {}",
                    TARGETS.join(", ")
                ),
            },
        }
    }
    if chosen.is_empty() {
        chosen = TARGETS.to_vec();
    }
    let bins = build()?;
    for t in chosen {
        let r = fuzz_one(&bins, t, seconds)?;
        println!(
            "fuzz {}: {} executions in {:.0} s ({:.0}/s), corpus {} inputs, no crash",
            r.target,
            r.runs,
            r.seconds,
            r.runs as f64 / r.seconds.max(0.001),
            r.corpus
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The smoke run: every target briefly, all together `total_seconds` of
/// fuzzing at most; returns (targets without a crash, targets with one).
pub fn smoke(total_seconds: u64) -> Result<(u64, u64)> {
    let t = Instant::now();
    let bins = build()?;
    eprintln!(
        "xtask: fuzz targets built in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    smoke_run(&bins, total_seconds)
}

/// The smoke run of targets already built in `bins` (`cargo xtask test`
/// builds them beside its other phases: [`build_command`]).
pub fn smoke_run(bins: &Path, total_seconds: u64) -> Result<(u64, u64)> {
    let each = (total_seconds / TARGETS.len() as u64).max(1);
    // libFuzzer runs on one core: the targets share the machine's cores, so
    // the smoke run's wall time is its fuzzing time over the core count.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<Run>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..cores.min(TARGETS.len()))
            .map(|_| {
                s.spawn(|| {
                    let mut mine = vec![];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(target) = TARGETS.get(i) else {
                            return mine;
                        };
                        mine.push(fuzz_one(bins, target, each));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            // A worker that panicked counts as a failure, not as nothing.
            .flat_map(|w| {
                w.join()
                    .unwrap_or_else(|_| vec![Err(anyhow::anyhow!("a fuzz worker panicked"))])
            })
            .collect()
    });
    let (mut execs, mut passed, mut failed) = (0, 0, 0);
    for r in results {
        match r {
            Ok(run) => {
                execs += run.runs;
                passed += 1;
            }
            Err(e) => {
                eprintln!("xtask: {e:#}");
                failed += 1;
            }
        }
    }
    eprintln!(
        "xtask: fuzz smoke run: {} targets, {execs} executions in {each} s each, {failed} with a crash",
        TARGETS.len()
    );
    Ok((passed, failed))
}

/// libFuzzer's coverage instrumentation, as cargo-fuzz 0.13 sets it for a
/// build without a sanitizer on Linux.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "--cfg",
    "fuzzing",
];

/// Builds every target once; returns the directory holding the binaries.
fn build() -> Result<PathBuf> {
    status(&mut build_command()).context("building the fuzz targets failed")?;
    Ok(bins_dir())
}

/// The build of every target, in a target directory of its own.
pub fn build_command() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["build", "--package", "podscope-fuzz", "--bins"])
        .args(["--profile", PROFILE, "--target", TRIPLE])
        .arg("--target-dir")
        .arg(root().join(TARGET_DIR))
        // With --target the flags reach the targets' crates, not the
        // build scripts and proc macros.
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"))
        // The parsers need no eBPF object: skip its nightly build.
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

/// Where [`build_command`] leaves the targets.
pub fn bins_dir() -> PathBuf {
    root().join(TARGET_DIR).join(TRIPLE).join(PROFILE)
}

fn fuzz_one(bins: &Path, target: &'static str, seconds: u64) -> Result<Run> {
    let fuzz = root().join("fuzz");
    let seeds = fuzz.join("corpus").join(target);
    let scratch = root().join("target/fuzz-corpus").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    std::fs::create_dir_all(&scratch)?;
    std::fs::create_dir_all(&artifacts)?;
    let t = Instant::now();
    let out = Command::new(bins.join(target))
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // Large enough for a real BTF slice or iptables-save dump in the corpus.
        .arg("-max_len=65536")
        // A hang is a bug: one input may take at most 10 s.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg(&scratch)
        .arg(&seeds)
        .output()
        .with_context(|| format!("cannot run the fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // The panic's message, and libFuzzer's summary with the input.
        let panic: Vec<&str> = log
            .lines()
            .skip_while(|l| !l.contains("panicked at"))
            .take(2)
            .collect();
        let tail: Vec<&str> = log.lines().rev().take(8).collect();
        bail!(
            "fuzz target {target} found a crash (input saved under {}):\n{}\n...\n{}",
            artifacts.display(),
            panic.join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    // libFuzzer's last line: "Done 12345 runs in 5 second(s)".
    let runs = log
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("Done ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    let corpus = std::fs::read_dir(&scratch)
        .map(|d| d.count() as u64)
        .unwrap_or(0)
        + std::fs::read_dir(&seeds)
            .map(|d| d.count() as u64)
            .unwrap_or(0);
    Ok(Run {
        target,
        runs,
        corpus,
        seconds: t.elapsed().as_secs_f64(),
    })
}
