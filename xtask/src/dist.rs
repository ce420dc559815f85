//! `cargo xtask dist [--out DIR]`: the release artefacts. One static
//! `podscope` per architecture (musl, so it runs on any distribution and in
//! any image), named as Docker names the platform (`podscope-linux-amd64`,
//! `podscope-linux-arm64`, what deploy/Dockerfile copies for `TARGETARCH`),
//! and `SHA256SUMS` beside them (`sha256sum -c SHA256SUMS` checks them).
//! Each binary is checked before it is published: an ELF of its
//! architecture with no program interpreter (statically linked).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{arch::Arch, cargo, root, status};

const USAGE: &str = "usage: cargo xtask dist [--out DIR]   (default DIR: target/dist)";

pub fn run(args: &[String]) -> Result<ExitCode> {
    let mut out = root().join("target").join("dist");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => {
                out = PathBuf::from(
                    it.next()
                        .with_context(|| format!("--out needs a directory\n{USAGE}"))?,
                )
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    crate::setup::run()?;
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let started = Instant::now();
    build(&Arch::ALL)?;
    eprintln!(
        "xtask: dist: built for {} targets in {:.1} s",
        Arch::ALL.len(),
        started.elapsed().as_secs_f64()
    );
    let mut names = vec![];
    for arch in Arch::ALL {
        let bin = root()
            .join("target")
            .join(arch.musl_target())
            .join("release/podscope");
        check_static(&bin, arch)?;
        let name = format!("podscope-linux-{}", arch.debian());
        fs::copy(&bin, out.join(&name))
            .with_context(|| format!("cannot copy {} to {}", bin.display(), out.display()))?;
        eprintln!(
            "xtask: dist: {name} ({}, {:.1} MB)",
            arch.musl_target(),
            fs::metadata(out.join(&name))?.len() as f64 / 1e6,
        );
        names.push(name);
    }
    let sums = Command::new("sha256sum")
        .args(&names)
        .current_dir(&out)
        .output()
        .context("cannot run sha256sum")?;
    if !sums.status.success() {
        bail!(
            "sha256sum failed: {}",
            String::from_utf8_lossy(&sums.stderr).trim()
        );
    }
    fs::write(out.join("SHA256SUMS"), &sums.stdout)?;
    print!("{}", String::from_utf8_lossy(&sums.stdout));
    println!(
        "dist: {} binaries and SHA256SUMS in {}",
        names.len(),
        out.canonicalize().unwrap_or(out).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The static `podscope` the image ships for this machine's architecture,
/// built: what `cargo xtask bench soak --shipped` runs.
pub fn shipped_for_host() -> Result<PathBuf> {
    let arch = Arch::host().context("no static build for this machine's architecture")?;
    build(&[arch])?;
    let bin = root()
        .join("target")
        .join(arch.musl_target())
        .join("release/podscope");
    check_static(&bin, arch)?;
    Ok(bin)
}

/// Builds the release `podscope` for every arch, static, in one cargo run
/// (the targets' builds share the cores).
fn build(arches: &[Arch]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--locked", "--quiet"]);
    for a in arches {
        cmd.args(["--target", a.musl_target()]);
        let (var, cc) = a.c_compiler();
        cmd.env(var, cc);
    }
    cmd.args(["-p", "podscope", "--bin", "podscope"]);
    status(&mut cmd).context("building the static podscope binaries failed")
}

/// ELF machine numbers (e_machine).
fn elf_machine(arch: Arch) -> u16 {
    match arch {
        Arch::X86_64 => 62,
        Arch::Aarch64 => 183,
    }
}

/// Fails unless `bin` is a 64-bit little-endian ELF for `arch` without a
/// PT_INTERP program header (a dynamic binary names its loader there).
fn check_static(bin: &Path, arch: Arch) -> Result<()> {
    let b = fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?;
    static_elf_of(&b)
        .map_err(anyhow::Error::msg)
        .and_then(|m| {
            if m == elf_machine(arch) {
                Ok(())
            } else {
                bail!(
                    "{} is for ELF machine {m}, not {}",
                    bin.display(),
                    arch.musl_target()
                )
            }
        })
        .with_context(|| {
            format!(
                "{} is not a static binary for {}",
                bin.display(),
                arch.musl_target()
            )
        })
}

/// The machine of a static 64-bit little-endian ELF.
fn static_elf_of(b: &[u8]) -> Result<u16, String> {
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
    };
    if !b.starts_with(b"\x7fELF\x02\x01") {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let machine = u16_at(18).ok_or("truncated header")?;
    let phoff = u64_at(32).ok_or("truncated header")? as usize;
    let phentsize = u16_at(54).ok_or("truncated header")? as usize;
    let phnum = u16_at(56).ok_or("truncated header")? as usize;
    for i in 0..phnum {
        const PT_INTERP: u32 = 3;
        let kind = u32_at(phoff + i * phentsize).ok_or("truncated program headers")?;
        if kind == PT_INTERP {
            return Err("it has a program interpreter (dynamically linked)".into());
        }
    }
    Ok(machine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_is_judged_by_its_interpreter() {
        // The test binary itself is a dynamic x86_64 or aarch64 ELF (the
        // host's gnu target): refused for having a loader.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(static_elf_of(&me).unwrap_err().contains("interpreter"));
        assert!(static_elf_of(b"#!/bin/sh\n").is_err());
    }
}
