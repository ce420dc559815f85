//! `cargo xtask node <subcommand> ...`: builds the release `podscope-testnode`
//! and runs it with the arguments (see testnode/README.md).

use std::process::{Command, ExitCode};

use anyhow::{Context, Result};

use crate::{cargo, root, status};

pub fn run(args: &[String]) -> Result<ExitCode> {
    status(cargo().args(["build", "--release", "--quiet", "-p", "testnode"]))?;
    let bin = root().join("target/release/podscope-testnode");
    let st = Command::new(&bin)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok(ExitCode::from(st.code().unwrap_or(1) as u8))
}
