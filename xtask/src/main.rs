//! `cargo xtask <task>`: podscope's developer tasks.
//!
//! - `setup`: everything the project needs on a fresh machine, idempotent.
//! - `run [-- ARGS]`: set up, build, and run `podscope ARGS` (default: `trace exits`).
//! - `test`: set up, then format check, clippy, and every test (as root: the
//!   kernel tests too, which then must not skip).
//! - `fuzz [--seconds N] [TARGET]...`: the parsers' fuzz targets (fuzz/), N seconds each.
//! - `bench <capability>`: side-by-side overhead measurements.
//! - `vm-test [--kernel NAME]... [--all]`: the kernel tests on other kernels, in VMs.
//! - `dist [--out DIR]`: static podscope binaries for every architecture, with checksums.

mod arch;
mod bench;
mod dist;
mod fuzz;
mod node;
mod setup;
mod summary;
mod vm;

use std::{
    env,
    path::PathBuf,
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <setup | run [-- PODSCOPE-ARGS] | test | fuzz [--seconds N] [TARGET]... | bench exits|pods|agent|terminations|net|throttle|faults | vm-test [--kernel NAME]... | dist [--out DIR]>";

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let args: Vec<String> = env::args().skip(1).collect();
    let (task, rest) = args
        .split_first()
        .map(|(t, r)| (t.as_str(), r))
        .unwrap_or(("", &[]));
    match task {
        "setup" => setup::run().map(|_| ExitCode::SUCCESS),
        "run" => run(rest),
        "test" => test(),
        "fuzz" => fuzz::run(rest),
        "bench" => bench::run(rest),
        "node" => node::run(rest),
        "vm-test" => vm::run(rest),
        "dist" => dist::run(rest),
        // The benchmarks' workload, run as a separate small process.
        "storm" => bench::storm(rest),
        "pingpong" => bench::pingpong(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unknown task `{other}`\n{USAGE}"),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs a command, failing with its name when it fails.
pub fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

/// Builds the release `podscope` binary and returns its path.
pub fn build_podscope() -> Result<PathBuf> {
    status(cargo().args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "podscope",
        "--bin",
        "podscope",
    ]))?;
    Ok(root().join("target/release/podscope"))
}

/// `cargo xtask run`: the quick start. With no arguments it brings up the
/// test node with the example pods and runs the agent against it, so that
/// /metrics shows real pods; with arguments it runs `podscope ARGS`.
fn run(rest: &[String]) -> Result<ExitCode> {
    setup::run()?;
    let bin = build_podscope()?;
    let args: Vec<String> = match rest {
        [dashdash, tail @ ..] if dashdash == "--" => tail.to_vec(),
        tail => tail.to_vec(),
    };
    let args = if args.is_empty() {
        demo_node()?;
        vec![
            "agent".into(),
            "--cri-socket".into(),
            NODE_SOCKET.into(),
            // Where the test node's kube-proxy rules are.
            "--netns".into(),
            "/run/netns/podscope-node".into(),
        ]
    } else {
        args
    };
    eprintln!("xtask: running {} {}", bin.display(), args.join(" "));
    if args.first().is_some_and(|a| a == "agent") {
        eprintln!(
            "xtask: try `curl -s localhost:9811/metrics | grep process_exits`, `target/release/podscope why examples/ignores-sigterm` \
             and `curl -sN --unix-socket /run/podscope/api.sock http://localhost/api/v1/events` (as root: the node-wide API is on that socket); \
             Ctrl-C stops the agent; `cargo xtask node down` removes the test node"
        );
    }
    let st = Command::new(&bin)
        .args(&args)
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok(ExitCode::from(st.code().unwrap_or(1) as u8))
}

pub const NODE_SOCKET: &str = "/run/podscope-node/containerd.sock";

/// The test node with the example pods (examples/pods/), for the quick start.
fn demo_node() -> Result<()> {
    status(cargo().args(["build", "--release", "--quiet", "-p", "testnode"]))?;
    let node = root().join("target/release/podscope-testnode");
    status(Command::new(&node).arg("up"))?;
    let mut examples: Vec<_> = std::fs::read_dir(root().join("examples/pods"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    examples.sort();
    for ex in examples {
        status(
            Command::new(&node)
                .arg("apply")
                .arg("-f")
                .arg(&ex)
                .stdout(std::process::Stdio::null()),
        )?;
        eprintln!("xtask: applied {}", ex.display());
    }
    Ok(())
}

fn test() -> Result<ExitCode> {
    // Each phase prints its wall time, so that a slow CI run says where the
    // time went (the budget is in the README).
    let phase = Instant::now();
    setup::run()?;
    let root_user = unsafe_geteuid() == 0;
    status(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted: run `cargo fmt --all`")?;
    status(cargo().args(["clippy", "--quiet", "--all-targets", "--", "-D", "warnings"]))?;
    // The kernel matrix's build leaves the agent's daemon out: lint that
    // selection too (cfg'd-out code can leave warnings only it shows).
    status(
        cargo()
            .args(["clippy", "--quiet", "--lib"])
            .args(vm::KERNEL_TESTS_BUILD)
            .args(["--", "-D", "warnings"]),
    )?;
    eprintln!(
        "xtask: phase: set-up, fmt and clippy in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    let phase = Instant::now();
    let mut tally = summary::Tally::new(root_user);
    // Every parser of outside input meets arbitrary bytes: 60 s in all.
    match fuzz::smoke(60) {
        Ok((passed, failed)) => tally.fuzz(passed, failed),
        Err(e) => {
            eprintln!("xtask: the fuzz smoke run could not run: {e:#}");
            tally.broken("fuzz");
        }
    }
    eprintln!(
        "xtask: phase: fuzz build and smoke run in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    // The kernel matrix first, so that the summary stays last; each kernel
    // is its own run, so that each gets its own line in the breakdown. The
    // guests run side by side: each is emulated on one host thread, so two
    // share this machine's two cores instead of queueing. The host kernel's
    // column is left out: agent/tests/kernel.rs runs the same scenarios on
    // it (`cargo xtask vm-test --kernel host` runs it alone).
    let kernels: Vec<vm::Target> = vm::TARGETS
        .iter()
        .filter(|t| vm::DEFAULT_MATRIX.contains(&t.name) && !matches!(t.source, vm::Source::Host))
        .copied()
        .collect();
    let phase = Instant::now();
    if let Err(e) = vm::prebuild(&kernels) {
        eprintln!("xtask: the kernel matrix's test binaries could not be built: {e:#}");
    }
    eprintln!(
        "xtask: phase: kernel matrix binaries built in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    let phase = Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let runs: Vec<_> = kernels
            .iter()
            .map(|t| s.spawn(move || vm::matrix(&[*t])))
            .collect();
        runs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the kernel run panicked")))
            })
            .collect()
    });
    for (t, result) in kernels.iter().zip(results) {
        match result {
            Ok(totals) => tally.matrix(t.name, &totals),
            Err(e) => {
                eprintln!(
                    "xtask: the kernel matrix could not run on {}: {e:#}",
                    t.name
                );
                tally.broken(&format!("matrix {}", t.name));
            }
        }
    }
    eprintln!(
        "xtask: phase: kernel matrix ran in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    let mut cmd = cargo();
    // Every test binary runs, even after one failed: the counts are whole.
    // Fault-injection switches exist in test builds only.
    cmd.args([
        "test",
        "--release",
        "--no-fail-fast",
        "--features",
        "podscope/fault-injection",
    ]);
    if root_user {
        // As root, a kernel test that cannot run is a failure, not a skip.
        cmd.env("PODSCOPE_REQUIRE_KERNEL_TESTS", "1");
    } else {
        eprintln!(
            "xtask: not root: the tests that load eBPF programs will be skipped (run as root to run them)"
        );
    }
    // The pod tests bring the test node up; leave the machine as we found it.
    let node_was_up = std::path::Path::new(NODE_SOCKET).exists();
    let phase = Instant::now();
    let result = run_tests(cmd, tally, &mut std::io::stdout().lock());
    eprintln!(
        "xtask: phase: cargo test (build and run) in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    let testnode = root().join("target/release/podscope-testnode");
    if !node_was_up && root_user && testnode.exists() {
        let _ = Command::new(&testnode)
            .arg("down")
            .stdout(std::process::Stdio::null())
            .status();
    }
    result
}

/// Runs `cargo test`, passing its output through (stdout and stderr merged,
/// so that each `SKIPPED` line falls within its test binary), then prints
/// what each layer proved and one summary line.
fn run_tests(
    mut cmd: Command,
    mut tally: summary::Tally,
    out: &mut dyn std::io::Write,
) -> Result<ExitCode> {
    use std::io::{BufRead, BufReader};
    let (reader, writer) = std::io::pipe().context("cannot make a pipe")?;
    let mut child = cmd
        .stdout(writer.try_clone().context("cannot clone a pipe")?)
        .stderr(writer)
        .spawn()
        .context("cannot run cargo test")?;
    // `cmd` holds the parent's copies of the write end: without them the
    // read below ends when cargo and its test binaries do.
    drop(cmd);
    for line in BufReader::new(reader).lines() {
        let line = line?;
        writeln!(out, "{line}")?;
        tally.line(&line);
    }
    let st = child.wait()?;
    let all = tally.print(out)?;
    if all.failed > 0 {
        bail!("{} tests failed", all.failed);
    }
    if !st.success() {
        bail!("cargo test failed ({st})");
    }
    if all.passed == 0 {
        bail!("no test ran");
    }
    Ok(ExitCode::SUCCESS)
}

fn unsafe_geteuid() -> u32 {
    // Read from /proc to avoid a libc dependency in xtask.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merged pipe: a skip line on stderr lands within its binary, and
    /// the read ends when the command does.
    #[test]
    fn run_tests_reads_stdout_and_stderr_in_order() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo '     Running tests/kernel.rs (target/release/deps/kernel-1)' >&2; \
             echo 'SKIPPED sigkill: needs root' >&2; \
             echo 'test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured'",
        ]);
        let mut out = vec![];
        assert!(run_tests(cmd, summary::Tally::new(false), &mut out).is_ok());
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.ends_with("tests: 1 passed, 0 failed, 1 skipped\n"),
            "{out}"
        );
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo '     Running tests/kernel.rs (x)' >&2; echo 'SKIPPED sigkill: needs root' >&2; \
             echo 'test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured'",
        ]);
        let err = run_tests(cmd, summary::Tally::new(true), &mut vec![]).unwrap_err();
        assert_eq!(err.to_string(), "1 tests failed");
    }
}
