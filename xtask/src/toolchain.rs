//! Where the project keeps the tools it installs for itself.
//!
//! bpf-linker links eBPF objects with the nightly's own LLVM; the binary pins
//! that exact library, so it is installed in a directory keyed by the nightly
//! (version and commit). A new nightly gets a new bpf-linker built with the
//! matching `llvm-<major>` feature, next to the old one.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The eBPF toolchain: rustup's `nightly`.
pub const NIGHTLY: &str = "nightly";
/// The bpf-linker release the project builds.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// `$PODSCOPE_CACHE`, else `$XDG_CACHE_HOME/podscope`, else `~/.cache/podscope`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = env::var_os("PODSCOPE_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("podscope");
    }
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache").join("podscope")
}

/// The Python virtualenv `cargo xtask setup` creates for the deploy/ checks
/// (kubernetes-validate, yamllint); deploy/tests find the tools in its `bin/`.
pub fn python_venv() -> PathBuf {
    cache_dir().join("venv")
}

/// What `rustc +nightly -vV` says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nightly {
    pub release: String,
    pub commit: String,
    pub llvm_major: u32,
    pub sysroot: PathBuf,
}

impl Nightly {
    pub fn detect() -> Result<Nightly, String> {
        let run = |args: &[&str]| -> Result<String, String> {
            let out = Command::new("rustc")
                .arg(format!("+{NIGHTLY}"))
                .args(args)
                .output()
                .map_err(|e| format!("cannot run `rustc +{NIGHTLY}`: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "`rustc +{NIGHTLY} {}` failed: the nightly toolchain is needed to build eBPF programs ({})",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let mut n = Nightly::parse_version(&run(&["-vV"])?)?;
        n.sysroot = PathBuf::from(run(&["--print", "sysroot"])?.trim());
        Ok(n)
    }

    /// Parses `rustc -vV`.
    pub fn parse_version(vv: &str) -> Result<Nightly, String> {
        let field = |name: &str| {
            vv.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|s| s.trim().to_string())
                .ok_or_else(|| format!("`rustc +{NIGHTLY} -vV` printed no `{name}` line"))
        };
        let llvm = field("LLVM version:")?;
        let llvm_major = llvm
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| format!("cannot read the LLVM major version from `{llvm}`"))?;
        Ok(Nightly {
            release: field("release:")?,
            commit: field("commit-hash:")
                .unwrap_or_default()
                .chars()
                .take(12)
                .collect(),
            llvm_major,
            sysroot: PathBuf::new(),
        })
    }

    /// The directory name part that identifies this nightly.
    pub fn key(&self) -> String {
        format!("{}-{}-llvm{}", self.release, self.commit, self.llvm_major)
    }

    /// Where bpf-linker for this nightly is installed (`<root>/bin/bpf-linker`).
    pub fn bpf_linker_root(&self) -> PathBuf {
        cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-{}", self.key()))
    }

    pub fn bpf_linker(&self) -> PathBuf {
        self.bpf_linker_root().join("bin").join("bpf-linker")
    }
}

/// The bpf-linker to build with, if the project installed one for the
/// current nightly. Its directory goes first on PATH for the eBPF build.
pub fn installed_bpf_linker() -> Result<PathBuf, String> {
    let nightly = Nightly::detect()?;
    let linker = nightly.bpf_linker();
    if is_executable(&linker) {
        Ok(linker)
    } else {
        Err(format!(
            "bpf-linker for {} (LLVM {}) is not installed: run `cargo xtask setup` once (it builds it in about a minute)",
            nightly.release, nightly.llvm_major
        ))
    }
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_nightly_and_its_llvm() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-11-01)\nbinary: rustc\ncommit-hash: e50aa6fba4e6aaaa\nhost: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        let n = Nightly::parse_version(vv).unwrap();
        assert_eq!(n.llvm_major, 22);
        assert_eq!(n.key(), "1.97.0-nightly-e50aa6fba4e6-llvm22");
        assert!(
            Nightly::parse_version("release: x\n")
                .unwrap_err()
                .contains("LLVM")
        );
    }
}
