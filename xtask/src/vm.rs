//! `cargo xtask vm-test [--kernel NAME]... [--all]`: podscope's kernel tests
//! on other kernels and architectures.
//!
//! Each Debian kernel of the matrix (amd64 and arm64) is fetched with
//! `apt-get download` (and cached), booted under qemu with software
//! emulation (TCG: KVM cannot run stock kernels on this machine, and arm64
//! needs emulation anyway) from an initramfs that holds busybox, the
//! kernel's netfilter modules and the static `podscope-kernel-tests` of the
//! guest's architecture, which runs as PID 1's child and prints its results
//! on the serial console. The host kernel runs the same binary directly. The
//! result is one table, kernels × scenarios, with the exact error of every
//! failure; the exit status is non-zero on any unexpected failure.

mod debs;
mod initramfs;
mod kernels;
mod modules;
mod qemu;
mod report;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};

pub use report::Totals;

use crate::{arch::Arch, cargo, root, status};

const TEST_BIN: &str = "podscope-kernel-tests";
/// Cargo.toml's profile for the test binaries: less optimised than a release.
const PROFILE: &str = "kernel-tests";
/// Their own target directory: `cargo xtask test` builds them beside its
/// other builds, and cargo locks a target directory for a whole build.
const TARGET_DIR: &str = "target/matrix";
/// What the matrix builds: the test binary, the agent's kernel side only
/// (the test command's clippy checks the same selection).
pub const KERNEL_TESTS_BUILD: &[&str] =
    &["-p", "podscope", "--no-default-features", "--bin", TEST_BIN];

/// One kernel of the matrix and what is known about it.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The name `--kernel` takes.
    pub name: &'static str,
    /// The guest's architecture (the host's for `Source::Host`).
    pub arch: Arch,
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
    /// The newest Debian package named `prefix`, a version, `-`, `flavour`,
    /// the architecture and `-unsigned`: `linux-image-6.1.0-57-cloud-arm64-unsigned`.
    Debian {
        prefix: &'static str,
        flavour: &'static str,
    },
}

impl Source {
    /// The package name's prefix and suffix for `arch`.
    fn package(self, arch: Arch) -> Option<(&'static str, String)> {
        match self {
            Source::Host => None,
            Source::Debian { prefix, flavour } => {
                Some((prefix, format!("-{flavour}{}-unsigned", arch.debian())))
            }
        }
    }
}

/// Measured in these guests (see BENCHMARKS.md, "Kernel matrix"): every
/// hook type loads and attaches, so raw_tp (first: no BTF parse at attach)
/// is chosen; only netfilter links need 6.4.
const DEBIAN_6_1: &[&str] = &[
    "exits=raw_tp",
    "tp_btf=ok",
    "raw_tp=ok",
    "tracepoint=ok",
    "fentry=ok",
    "kprobe=ok",
    "lsm=ok",
    "netfilter_link=refused",
];
const DEBIAN_6_12: &[&str] = &[
    "exits=raw_tp",
    "tp_btf=ok",
    "raw_tp=ok",
    "tracepoint=ok",
    "fentry=ok",
    "kprobe=ok",
    "lsm=ok",
    "netfilter_link=ok",
];

const CLOUD_6_1: Source = Source::Debian {
    prefix: "linux-image-6.1.0-",
    flavour: "cloud-",
};
const CLOUD_6_12: Source = Source::Debian {
    prefix: "linux-image-6.12.",
    flavour: "cloud-",
};

/// Debian's arm64 6.1 (measured): as on amd64, except that BPF trampolines
/// are refused (ENOTSUPP): arm64 attaches them through ftrace direct
/// calls, which it has from 6.4. Every family has a tracepoint path.
const DEBIAN_6_1_ARM64: &[&str] = &[
    "exits=raw_tp",
    "tp_btf=ok",
    "raw_tp=ok",
    "tracepoint=ok",
    "fentry=refused",
    "kprobe=ok",
    "lsm=refused",
    "netfilter_link=refused",
];

/// Every kernel `--kernel` knows, the default matrix first.
pub const TARGETS: &[Target] = &[
    Target {
        name: "6.1-cloud",
        arch: Arch::X86_64,
        source: CLOUD_6_1,
        expect: DEBIAN_6_1,
        expected_skips: &[],
    },
    Target {
        name: "6.12-cloud-arm64",
        arch: Arch::Aarch64,
        source: CLOUD_6_12,
        expect: DEBIAN_6_12,
        expected_skips: &[],
    },
    Target {
        // The host's hook types depend on the machine CI runs on (this kind
        // refuses trampolines and has no kprobes; production kernels differ):
        // only the exits choice is asserted, the rest is reported.
        name: "host",
        arch: Arch::X86_64,
        source: Source::Host,
        expect: &["exits=raw_tp"],
        expected_skips: &[],
    },
    Target {
        name: "6.12-cloud",
        arch: Arch::X86_64,
        source: CLOUD_6_12,
        expect: DEBIAN_6_12,
        expected_skips: &[],
    },
    Target {
        name: "6.1-cloud-arm64",
        arch: Arch::Aarch64,
        source: CLOUD_6_1,
        expect: DEBIAN_6_1_ARM64,
        expected_skips: &[],
    },
    Target {
        // Debian's generic 6.1 (more drivers, same BPF features): `--all` only.
        name: "6.1",
        arch: Arch::X86_64,
        source: Source::Debian {
            prefix: "linux-image-6.1.0-",
            flavour: "",
        },
        expect: DEBIAN_6_1,
        expected_skips: &[],
    },
];

/// The matrix `cargo xtask test` runs: both architectures, both kernel
/// series (6.1: no netfilter links, the conntrack fallback; 6.12: links),
/// crossed so that each series runs on one architecture in the time budget
/// (BENCHMARKS.md, "Kernel matrix"); `--all` runs every pair.
pub const DEFAULT_MATRIX: &[&str] = &["6.1-cloud", "6.12-cloud-arm64", "host"];

const USAGE: &str = "usage: cargo xtask vm-test [--kernel NAME]... [--all]   (NAME: 6.1-cloud, 6.12-cloud-arm64, host, 6.12-cloud, 6.1-cloud-arm64, 6.1)";

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

/// The architecture of a kernel's test binary.
fn arch_of(t: &Target) -> Arch {
    match t.source {
        Source::Host => Arch::host().unwrap_or(t.arch),
        Source::Debian { .. } => t.arch,
    }
}

/// Every architecture `targets` need, once each.
fn arches(targets: &[Target]) -> Vec<Arch> {
    let mut arches: Vec<Arch> = vec![];
    for t in targets {
        if !arches.contains(&arch_of(t)) {
            arches.push(arch_of(t));
        }
    }
    arches
}

/// The build of the test binaries of every architecture `targets` need,
/// in one cargo run (their compiles overlap on the cores); a later
/// [`matrix`] of any subset finds them fresh. `cargo xtask test` runs it
/// beside its other phases.
pub fn build_command(targets: &[Target]) -> Command {
    test_binaries_command(&arches(targets))
}

/// Runs the matrix, prints its table, and returns the counts (an error
/// only when the matrix could not run at all, e.g. the build failed).
pub fn matrix(targets: &[Target]) -> Result<Totals> {
    let t0 = Instant::now();
    let arches = arches(targets);
    let started = Instant::now();
    let bins = build_test_binaries(&arches)?;
    eprintln!(
        "xtask: vm-test: {TEST_BIN} for {} built in {:.1} s",
        arches
            .iter()
            .map(|a| a.musl_target())
            .collect::<Vec<_>>()
            .join(" and "),
        started.elapsed().as_secs_f64()
    );
    let work = root().join("target").join("vm-test");
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let mut runs = vec![];
    for t in targets {
        let arch = arch_of(t);
        let bin = &bins
            .iter()
            .find(|(a, _)| *a == arch)
            .context("a test binary per architecture")?
            .1;
        let started = Instant::now();
        let mut run = match t.source.package(arch) {
            None => host_run(bin, t),
            Some((prefix, suffix)) => guest_run(t, arch, bin, prefix, &suffix, &work),
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

/// Boots one Debian kernel with an initramfs of its own (its modules, the
/// busybox and test binary of its architecture).
fn guest_run(
    t: &Target,
    arch: Arch,
    bin: &Path,
    prefix: &str,
    suffix: &str,
    work: &Path,
) -> report::Run {
    let prepared = kernels::fetch(prefix, suffix).and_then(|k| {
        let busybox = debs::busybox(arch.debian())?;
        let initrd = work.join(format!("{}.cpio", t.name));
        initramfs::build(&busybox, bin, &k.modules, &initrd)?;
        Ok((k, initrd))
    });
    match prepared {
        Ok((k, initrd)) => qemu::boot(
            arch,
            &k,
            &initrd,
            &expect_args(t),
            &work.join(format!("{}.log", t.name)),
        ),
        Err(e) => report::Run::broken(format!("{e:#}")),
    }
}

/// `--expect` arguments for a target.
fn expect_args(t: &Target) -> Vec<String> {
    t.expect
        .iter()
        .flat_map(|e| ["--expect".to_string(), e.to_string()])
        .collect()
}

/// Builds the static test binary for each of `arches` in one cargo run,
/// so that the two targets' builds share the cores (the agent crate is one
/// long compile per target: side by side they overlap); the agent's build
/// script builds the eBPF object for the BPF target, with `bpf_target_arch`
/// set from each Rust target's architecture. Without the agent's `daemon`
/// feature: the scenarios need the probes and their decoders, not the HTTP
/// server, TLS, metrics, CRI client or async runtime, which were two
/// thirds of this build.
fn build_test_binaries(arches: &[Arch]) -> Result<Vec<(Arch, PathBuf)>> {
    status(&mut test_binaries_command(arches))
        .context("building the static kernel-test binaries failed")?;
    Ok(arches
        .iter()
        .map(|a| {
            let bin = root()
                .join(TARGET_DIR)
                .join(a.musl_target())
                .join(PROFILE)
                .join(TEST_BIN);
            (*a, bin)
        })
        .collect())
}

fn test_binaries_command(arches: &[Arch]) -> Command {
    let mut cmd = cargo();
    cmd.args(["build", "--profile", PROFILE, "--quiet"])
        .arg("--target-dir")
        .arg(root().join(TARGET_DIR));
    for a in arches {
        cmd.args(["--target", a.musl_target()]);
        let (var, cc) = a.c_compiler();
        cmd.env(var, cc);
    }
    cmd.args(KERNEL_TESTS_BUILD);
    cmd
}

/// Without root it still runs: every scenario then reports its skip, and
/// the column shows them (counted as skipped, with the reason) instead of
/// vanishing from the table; as root a skip is a failure as on the guests.
fn host_run(bin: &Path, t: &Target) -> report::Run {
    let out = Command::new(bin).args(expect_args(t)).output();
    let mut run = match out {
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            report::Run::parse(&text)
        }
        Err(e) => report::Run::broken(format!("cannot run {}: {e}", bin.display())),
    };
    if crate::unsafe_geteuid() != 0 {
        run.skips_allowed =
            Some("not root: the host kernel's column needs root to load eBPF programs".into());
    }
    run
}
