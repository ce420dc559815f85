//! `cargo xtask setup`: installs what the project needs, idempotently, and in
//! a couple of seconds when everything is already there.
//!
//! 1. nightly's rust-src (the eBPF build compiles `core` for the BPF target);
//! 2. bpf-linker built against the nightly's own LLVM, keyed by the nightly;
//! 3. the static (musl) Rust targets of every architecture podscope ships
//!    for (`cargo xtask dist`, the kernel matrix); aarch64 links with the
//!    toolchain's own rust-lld (.cargo/config.toml), so no cross compiler;
//! 4. the Debian packages the tests and benchmarks use, and dpkg's other
//!    architecture (arm64 on x86_64) so the matrix can fetch that
//!    architecture's kernels and busybox;
//! 5. a Python virtualenv with the pinned tools the tests run
//!    (kubernetes-validate, yamllint, prometheus-client), under `toolchain::python_venv()`.
//!
//! `PODSCOPE_SETUP_MINIMAL=1` does only 1 to 3, what building the binaries
//! needs: the container image's builder stage (deploy/Dockerfile) uses it.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use xtask::toolchain::{
    BPF_LINKER_VERSION, NIGHTLY, Nightly, cache_dir, is_executable, python_venv,
};

use crate::{arch::Arch, status};

/// Debian packages: bpftrace is the peer tool the benchmarks compare against;
/// bpftool reads the kernel's own per-program run-time statistics for them;
/// qemu-system-x86 and qemu-system-arm boot the kernel matrix (xz-utils
/// unpacks its kernels' modules); busybox-static is the test node's images'
/// userspace (the guests' comes per architecture from Debian's archive);
/// the rest runs the test node.
const APT_PACKAGES: &[&str] = &[
    "bpftrace",
    // exitsnoop, sigsnoop, killsnoop, runqlat, runqslower, oomkill: the
    // CO-RE C peers of `cargo xtask bench peers`.
    "libbpf-tools",
    "bpftool",
    "util-linux",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "iptables",
    // kube-proxy's nftables mode: the agent reads it with `nft -j`, the test
    // node writes it with `nft -f`.
    "nftables",
    // Also deploy/'s tests: `promtool check rules` / `test rules` on the alert
    // rules and the dashboard's queries.
    "prometheus",
    "iproute2",
    // `python3 -m venv` for the tools below (Debian splits venv out of python3).
    "python3-venv",
    "qemu-system-x86",
    "qemu-system-arm",
    "xz-utils",
    // musl-gcc: the static kernel-test binary links ring (rustls' crypto), which compiles C.
    "musl-tools",
    // The same for aarch64 (cargo xtask dist, the arm64 kernel matrix).
    "gcc-aarch64-linux-gnu",
    // The metrics-TLS test: certificates, and requests with and without credentials.
    "openssl",
    "curl",
    // `cargo xtask bench net`: throughput between two pods through a ClusterIP.
    "iperf3",
    // `perf bench sched messaging`: a context-switch-heavy workload for `bench throttle`.
    "linux-perf",
];

/// Python tools the tests run, pinned so a new release cannot change what
/// passes: schema validation of the manifests and the YAML linter (deploy/),
/// and Prometheus' own OpenMetrics parser (`prometheus_client.openmetrics`,
/// strict about the format) for the agent's OpenMetrics exposition.
pub const PYTHON_TOOLS: &[(&str, &str)] = &[
    ("kubernetes-validate", "1.37.0"),
    ("yamllint", "1.38.0"),
    ("prometheus-client", "0.26.0"),
];

pub fn run() -> Result<()> {
    let t = Instant::now();
    rust_src()?;
    let nightly = Nightly::detect().map_err(anyhow::Error::msg)?;
    bpf_linker(&nightly)?;
    musl_targets()?;
    if env::var_os("PODSCOPE_SETUP_MINIMAL").is_some_and(|v| v == "1") {
        eprintln!("xtask: PODSCOPE_SETUP_MINIMAL=1: build tools only, no test packages");
    } else {
        foreign_architectures()?;
        apt_packages(APT_PACKAGES)?;
        python_tools(&python_venv(), PYTHON_TOOLS)?;
    }
    eprintln!(
        "xtask: set-up complete in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .context(
            "cannot run rustup: podscope builds its eBPF programs with rustup's nightly toolchain",
        )?;
    if !out.status.success() {
        bail!(
            "rustup has no `{NIGHTLY}` toolchain ({}); install it with `rustup toolchain install {NIGHTLY}`",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for {NIGHTLY}");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// The static targets: `cargo xtask dist` builds each, the kernel matrix
/// boots each architecture's test binary.
pub fn musl_targets() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup")?;
    let installed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = Arch::ALL
        .iter()
        .map(|a| a.musl_target())
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing the Rust targets {}", missing.join(" "));
    status(
        Command::new("rustup")
            .args(["target", "add"])
            .args(&missing),
    )
}

/// dpkg's other architectures, so that `apt-get download` finds their
/// kernels and busybox (nothing of theirs is installed), then the lists.
fn foreign_architectures() -> Result<()> {
    let native = Arch::host().map(Arch::debian);
    let out = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()
        .context("cannot run dpkg (is this Debian?)")?;
    let known = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = Arch::ALL
        .iter()
        .map(|a| a.debian())
        .filter(|a| Some(*a) != native && !known.lines().any(|l| l.trim() == *a))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for a in &missing {
        eprintln!("xtask: adding dpkg architecture {a} (for the kernel matrix's {a} kernels)");
        status(Command::new("dpkg").args(["--add-architecture", a]))?;
    }
    status(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get update failed (the set-up needs root and Debian's archive)")
}

fn bpf_linker(n: &Nightly) -> Result<()> {
    let linker = n.bpf_linker();
    if is_executable(&linker) && runs(&linker) {
        return Ok(());
    }
    if !(21..=23).contains(&n.llvm_major) {
        bail!(
            "{NIGHTLY} ({}) uses LLVM {}, which bpf-linker {BPF_LINKER_VERSION} does not support (it has llvm-21, llvm-22, llvm-23): \
             use a nightly with one of those, or raise BPF_LINKER_VERSION in xtask/src/toolchain.rs",
            n.release,
            n.llvm_major
        );
    }
    let libllvm = find_libllvm(&n.sysroot.join("lib"))?;
    // bpf-linker's build looks for LLVM under LLVM_PREFIX/lib; the nightly
    // ships only the shared library, which is all it needs.
    let prefix = cache_dir().join(format!("llvm-prefix-{}", n.key()));
    fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    symlink(&libllvm, &link).with_context(|| format!("cannot link {}", link.display()))?;
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {}); this takes about a minute",
        n.release, n.llvm_major
    );
    let rpath = n.sysroot.join("lib");
    status(
        Command::new("cargo")
            .args(["install", "--quiet", "--locked", "--force"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{}", n.llvm_major))
            .arg("--root")
            .arg(n.bpf_linker_root())
            .env("LLVM_PREFIX", &prefix)
            // The binary finds the nightly's libLLVM without LD_LIBRARY_PATH.
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", rpath.display()),
            )
            // Build it with the stable toolchain even when called from a nightly context.
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )
    .context("building bpf-linker failed")?;
    if !runs(&linker) {
        bail!(
            "bpf-linker was built at {} but does not run",
            linker.display()
        );
    }
    Ok(())
}

fn runs(linker: &Path) -> bool {
    Command::new(linker)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn find_libllvm(lib: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(lib).with_context(|| format!("cannot read {}", lib.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("libLLVM") && f.contains(".so"))
                // The nightly also ships a linker script of a similar name: take the ELF library.
                && fs::read(p).map(|b| b.starts_with(b"\x7fELF")).unwrap_or(false)
        })
        .collect();
    found.sort();
    found.into_iter().next().with_context(|| {
        format!(
            "the {NIGHTLY} toolchain has no libLLVM in {}: reinstall it with the rustc component",
            lib.display()
        )
    })
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn apt_packages(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    status(&mut apt(&["update", "-qq"]))
        .context("apt-get update failed (the set-up needs root and Debian's archive)")?;
    let mut install = apt(&["install", "-y", "-qq", "--no-install-recommends"]);
    install.args(&missing);
    status(&mut install).context("apt-get install failed")
}

/// A virtualenv at `venv` with exactly `tools` (name, version) installed.
/// When they already are, this is one short Python start-up.
fn python_tools(venv: &Path, tools: &[(&str, &str)]) -> Result<()> {
    let python = venv.join("bin/python3");
    if python_has(&python, tools) {
        return Ok(());
    }
    if !python.exists() {
        // Debian's interpreter, which python3-venv (above) goes with, rather
        // than whatever python3 comes first on PATH (pyenv and the like).
        let system = ["/usr/bin/python3", "python3"]
            .into_iter()
            .find(|p| !p.starts_with('/') || Path::new(p).exists())
            .unwrap_or("python3");
        eprintln!("xtask: creating a Python virtualenv in {}", venv.display());
        status(
            Command::new(system)
                .args(["-m", "venv", "--clear"])
                .arg(venv),
        )
        .context("cannot create the virtualenv deploy/'s tests use (is python3-venv installed?)")?;
    }
    let pins: Vec<String> = tools.iter().map(|(n, v)| format!("{n}=={v}")).collect();
    eprintln!("xtask: installing {}", pins.join(" "));
    status(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&pins),
    )
    .context("pip install failed (it needs PyPI)")?;
    if !python_has(&python, tools) {
        bail!(
            "{} still lacks {} after pip install",
            venv.display(),
            pins.join(" ")
        );
    }
    Ok(())
}

/// Whether `python` has each of `tools` installed at exactly its version.
fn python_has(python: &Path, tools: &[(&str, &str)]) -> bool {
    let Ok(out) = Command::new(python)
        .args([
            "-c",
            "import importlib.metadata as m, sys\n\
             for n in sys.argv[1:]:\n\
             \ttry: print(m.version(n))\n\
             \texcept m.PackageNotFoundError: print('-')",
        ])
        .args(tools.iter().map(|(n, _)| n))
        .output()
    else {
        return false;
    };
    let have = String::from_utf8_lossy(&out.stdout);
    out.status.success() && have.lines().eq(tools.iter().map(|(_, v)| *v))
}
