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
mod background;
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
    let started = Instant::now();
    let phase = Instant::now();
    setup::run()?;
    let root_user = unsafe_geteuid() == 0;
    status(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted: run `cargo fmt --all`")?;
    // What only later phases need is built beside the foreground, at the
    // lowest priority (background.rs): the fuzz targets from now on (they
    // skip the eBPF build), the matrix's binaries once clippy has built
    // this architecture's eBPF object, which they share. Both end with the
    // command if it stops early.
    let fuzz_build = background::Build::start(
        "fuzz targets",
        background::log_path("fuzz-build"),
        fuzz::build_command(),
    )?;
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
    // The kernel matrix: each kernel is its own run, so that each gets its
    // own line in the breakdown. The host kernel's column is left out:
    // agent/tests/kernel.rs runs the same scenarios on it (`cargo xtask
    // vm-test --kernel host` runs it alone).
    let kernels: Vec<vm::Target> = vm::TARGETS
        .iter()
        .filter(|t| vm::DEFAULT_MATRIX.contains(&t.name) && !matches!(t.source, vm::Source::Host))
        .copied()
        .collect();
    let matrix_build = background::Build::start(
        "kernel matrix's test binaries",
        background::log_path("matrix-build"),
        vm::build_command(&kernels),
    )?;

    let mut tally = summary::Tally::new(root_user);
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
    // Not locked for the whole command: the kernel runs print from threads of their own.
    let out = &mut std::io::stdout();
    let tests = run_cargo_test(cmd, &mut tally, out);
    eprintln!(
        "xtask: phase: cargo test (build and run) in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    // The agent on a node full of churning pods: bounded growth.
    use std::io::Write as _;
    let phase = Instant::now();
    if root_user {
        match bench::soak_check() {
            Ok(results) => tally.checks("soak", &results, out)?,
            Err(e) => {
                writeln!(out, "xtask: the soak could not run: {e:#}")?;
                tally.broken("soak");
            }
        }
    } else {
        writeln!(out, "SKIPPED soak: needs root (the test node)")?;
        tally.skipped("soak");
    }
    eprintln!(
        "xtask: phase: soak in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    let testnode = root().join("target/release/podscope-testnode");
    if !node_was_up && root_user && testnode.exists() {
        let _ = Command::new(&testnode)
            .arg("down")
            .stdout(std::process::Stdio::null())
            .status();
    }

    let phase = Instant::now();
    let built = matrix_build.wait();
    background_phase("kernel matrix binaries built", &built, phase);
    let phase = Instant::now();
    let results: Vec<Result<vm::Totals>> = match built {
        // The guests run side by side: each is emulated on one host
        // thread, so two share this machine's two cores instead of queueing.
        Ok(_) => std::thread::scope(|s| {
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
        }),
        Err(e) => {
            eprintln!("xtask: {e:#}");
            kernels
                .iter()
                .map(|_| Err(anyhow::anyhow!("its test binaries could not be built")))
                .collect()
        }
    };
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

    // Every parser of outside input meets arbitrary bytes: 60 s in all.
    let phase = Instant::now();
    let built = fuzz_build.wait();
    background_phase("fuzz build", &built, phase);
    let phase = Instant::now();
    match built.and_then(|_| fuzz::smoke_run(&fuzz::bins_dir(), 60)) {
        Ok((passed, failed)) => tally.fuzz(passed, failed),
        Err(e) => {
            eprintln!("xtask: the fuzz smoke run could not run: {e:#}");
            tally.broken("fuzz");
        }
    }
    eprintln!(
        "xtask: phase: fuzz smoke run in {:.0} s",
        phase.elapsed().as_secs_f64()
    );
    eprintln!(
        "xtask: the test command took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    finish(tally, tests, out)
}

/// The phase line of a build that ran in the background: how long it took
/// from its start, and how much of that the foreground waited.
fn background_phase(what: &str, built: &Result<background::Built>, asked: Instant) {
    match built {
        Ok(b) => eprintln!(
            "xtask: phase: {what} in {:.0} s, beside the phases above ({:.0} s waited for it)",
            b.took.as_secs_f64(),
            b.waited.as_secs_f64()
        ),
        Err(_) => eprintln!(
            "xtask: phase: {what}: failed ({:.0} s waited for it)",
            asked.elapsed().as_secs_f64()
        ),
    }
}

/// Runs `cargo test`, passing its output through (stdout and stderr merged,
/// so that each `SKIPPED` line falls within its test binary) and feeding
/// the tally; returns its exit status.
fn run_cargo_test(
    mut cmd: Command,
    tally: &mut summary::Tally,
    out: &mut dyn std::io::Write,
) -> Result<std::process::ExitStatus> {
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
    Ok(child.wait()?)
}

/// What each layer proved and the summary line, last; the command fails
/// when a test failed or `cargo test` did.
fn finish(
    tally: summary::Tally,
    tests: Result<std::process::ExitStatus>,
    out: &mut dyn std::io::Write,
) -> Result<ExitCode> {
    let all = tally.print(out)?;
    if all.failed > 0 {
        bail!("{} tests failed", all.failed);
    }
    let st = tests?;
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

    /// `cargo test`'s part of the test command, and its summary.
    fn run_tests(
        cmd: Command,
        mut tally: summary::Tally,
        out: &mut dyn std::io::Write,
    ) -> Result<ExitCode> {
        let tests = run_cargo_test(cmd, &mut tally, out);
        finish(tally, tests, out)
    }

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
