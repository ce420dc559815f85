//! `cargo xtask vm-test [--kernel NAME]... [--all]`: podscope's kernel tests
//! on other kernels.
//!
//! Each Debian kernel of the matrix is fetched with `apt-get download` (and
//! cached), booted under qemu with software emulation (TCG: KVM cannot run
//! stock kernels on this machine) from an initramfs that holds busybox and
//! the static `podscope-kernel-tests`, which runs as PID 1's child and
//! prints its results on the serial console. The host kernel runs the same
//! binary directly. The result is one table, kernels × scenarios, with the
//! exact error of every failure; the exit status is non-zero on any
//! unexpected failure.

mod initramfs;
mod kernels;
mod qemu;
mod report;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};

pub use report::Totals;

use crate::{cargo, root, status};

/// The Rust target of the static test binary.
const MUSL: &str = "x86_64-unknown-linux-musl";
const TEST_BIN: &str = "podscope-kernel-tests";

/// One kernel of the matrix and what is known about it.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The name `--kernel` takes.
    pub name: &'static str,
    /// Where the kernel comes from.
    pub source: Source,
    /// Expectations passed to the test binary (`--expect NAME=VALUE`): the
    /// exits hook it must choose, and which hook types the kernel allows.
    pub expect: &'static [&'static str],
    /// Scenarios that skip by design on this kernel.
    pub expected_skips: &'static [&'static str],
}

#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// The kernel this machine runs.
    Host,
    /// The newest Debian package whose name is `prefix` + version + `suffix`.
    Debian {
        prefix: &'static str,
        suffix: &'static str,
    },
}

/// Measured in these guests (DESIGN.md, "Other kernels, in VMs"): every
/// hook type loads and attaches, so tp_btf is chosen; only netfilter links
/// need 6.4.
const DEBIAN_6_1: &[&str] = &[
    "exits=tp_btf",
    "tp_btf=ok",
    "raw_tp=ok",
    "tracepoint=ok",
    "fentry=ok",
    "kprobe=ok",
    "lsm=ok",
    "netfilter_link=refused",
];
const DEBIAN_6_12: &[&str] = &[
    "exits=tp_btf",
    "tp_btf=ok",
    "raw_tp=ok",
    "tracepoint=ok",
    "fentry=ok",
    "kprobe=ok",
    "lsm=ok",
    "netfilter_link=ok",
];

/// Every kernel `--kernel` knows, the default matrix first.
pub const TARGETS: &[Target] = &[
    Target {
        name: "6.1-cloud",
        source: Source::Debian {
            prefix: "linux-image-6.1.0-",
            suffix: "-cloud-amd64-unsigned",
        },
        expect: DEBIAN_6_1,
        expected_skips: &[],
    },
    Target {
        name: "6.12-cloud",
        source: Source::Debian {
            prefix: "linux-image-6.12.",
            suffix: "-cloud-amd64-unsigned",
        },
        expect: DEBIAN_6_12,
        expected_skips: &[],
    },
    Target {
        // The host's hook types depend on the machine CI runs on (this kind
        // refuses trampolines and has no kprobes; production kernels differ):
        // only the exits choice is asserted, the rest is reported.
        name: "host",
        source: Source::Host,
        expect: &["exits=tp_btf"],
        expected_skips: &[],
    },
    Target {
        // Debian's generic 6.1 (more drivers, same BPF features): `--all` only.
        name: "6.1",
        source: Source::Debian {
            prefix: "linux-image-6.1.0-",
            suffix: "-amd64-unsigned",
        },
        expect: DEBIAN_6_1,
        expected_skips: &[],
    },
];

/// The matrix `cargo xtask test` runs.
pub const DEFAULT_MATRIX: &[&str] = &["6.1-cloud", "6.12-cloud", "host"];

const USAGE: &str = "usage: cargo xtask vm-test [--kernel NAME]... [--all]   (NAME: 6.1-cloud, 6.12-cloud, host, 6.1)";

/// `cargo xtask vm-test ARGS`.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let mut names: Vec<String> = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kernel" => names.push(
                it.next()
                    .with_context(|| format!("--kernel needs a name\n{USAGE}"))?
                    .clone(),
            ),
            "--all" => names.extend(TARGETS.iter().map(|t| t.name.to_string())),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    if names.is_empty() {
        names = DEFAULT_MATRIX.iter().map(|s| s.to_string()).collect();
    }
    let targets = names
        .iter()
        .map(|n| {
            TARGETS
                .iter()
                .find(|t| t.name == n)
                .copied()
                .with_context(|| format!("no kernel named `{n}`\n{USAGE}"))
        })
        .collect::<Result<Vec<_>>>()?;
    crate::setup::run()?;
    let totals = matrix(&targets)?;
    Ok(if totals.unexpected_failures() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Runs the matrix, prints its table, and returns the counts (an error
/// only when the matrix could not run at all, e.g. the build failed).
pub fn matrix(targets: &[Target]) -> Result<Totals> {
    let t0 = Instant::now();
    let bin = build_test_binary()?;
    let work = root().join("target").join("vm-test");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let mut runs = vec![];
    let mut initrd: Option<PathBuf> = None;
    for t in targets {
        if matches!(t.source, Source::Host) && crate::unsafe_geteuid() != 0 {
            // As with `cargo test`, a kernel test that cannot run without root
            // says so and skips; the guests run as root inside their VM.
            eprintln!("xtask: vm-test host: skipped, needs root to load eBPF programs");
            continue;
        }
        let started = Instant::now();
        let mut run = match t.source {
            Source::Host => host_run(&bin, t),
            Source::Debian { prefix, suffix } => {
                let initrd = match &initrd {
                    Some(p) => p.clone(),
                    None => {
                        let p = work.join("initramfs.cpio");
                        initramfs::build(&bin, &p)?;
                        initrd = Some(p.clone());
                        p
                    }
                };
                match kernels::fetch(prefix, suffix) {
                    Ok(k) => qemu::boot(
                        &k,
                        &initrd,
                        &expect_args(t),
                        &work.join(format!("{}.log", t.name)),
                    ),
                    Err(e) => report::Run::broken(format!("{e:#}")),
                }
            }
        };
        run.target = Some(*t);
        run.wall = started.elapsed();
        eprintln!(
            "xtask: vm-test {}: {} ({:.1} s)",
            t.name,
            run.kernel.as_deref().unwrap_or("kernel unknown"),
            run.wall.as_secs_f64()
        );
        runs.push(run);
    }
    let totals = report::print(&runs, &mut std::io::stdout().lock())?;
    println!(
        "kernel matrix: {} kernel{} in {:.1} s (consoles in {})",
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        t0.elapsed().as_secs_f64(),
        work.canonicalize().unwrap_or(work).display()
    );
    Ok(totals)
}

/// `--expect` arguments for a target.
fn expect_args(t: &Target) -> Vec<String> {
    t.expect
        .iter()
        .flat_map(|e| ["--expect".to_string(), e.to_string()])
        .collect()
}

/// Builds the static test binary (the agent's build script builds the eBPF
/// object for the BPF target whatever the host target is).
fn build_test_binary() -> Result<PathBuf> {
    status(
        cargo()
            .args([
                "build",
                "--release",
                "--quiet",
                "--target",
                MUSL,
                "-p",
                "podscope",
                "--bin",
                TEST_BIN,
            ])
            // ring (rustls' crypto, for the metrics listener's TLS) compiles C:
            // for musl with Debian's musl-gcc (package musl-tools).
            .env("CC_x86_64_unknown_linux_musl", "musl-gcc"),
    )
    .context("building the static kernel-test binary failed")?;
    Ok(root()
        .join("target")
        .join(MUSL)
        .join("release")
        .join(TEST_BIN))
}

/// The host kernel runs the same static binary directly.
fn host_run(bin: &Path, t: &Target) -> report::Run {
    let out = Command::new(bin).args(expect_args(t)).output();
    match out {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            report::Run::parse(&text)
        }
        Err(e) => report::Run::broken(format!("cannot run {}: {e}", bin.display())),
    }
}
