//! `cargo xtask bench <capability>`: overhead measured side by side.

use std::process::ExitCode;

use anyhow::{Result, bail};

pub fn run(args: &[String]) -> Result<ExitCode> {
    match args.first().map(String::as_str) {
        Some("exits") => todo_bench(),
        _ => bail!("usage: cargo xtask bench exits"),
    }
}

fn todo_bench() -> Result<ExitCode> {
    bail!("not yet")
}
