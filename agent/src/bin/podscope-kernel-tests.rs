//! podscope's kernel tests as one static binary, for kernels that have
//! nothing but busybox around them (the `cargo xtask vm-test` guests) and for
//! the host. Prints one `PODSCOPE-TEST` line per scenario and a summary line;
//! exits 1 when any scenario failed, 2 on a usage error.
//!
//! usage: podscope-kernel-tests [--expect NAME=VALUE]... [--only SCENARIO]... [--list]

use std::{path::PathBuf, process::ExitCode};

use podscope::selftest::{self, Context};

const USAGE: &str =
    "usage: podscope-kernel-tests [--expect NAME=VALUE]... [--only SCENARIO]... [--list]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut ctx = Context {
        // Helpers are this very binary, run again.
        helper: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
        expect: vec![],
    };
    let mut only = vec![];
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        let r = match arg.as_str() {
            "--helper" => match value("--helper") {
                Ok(mode) => return selftest::helper::run(&mode),
                Err(e) => Err(e),
            },
            "--expect" => value("--expect")
                .and_then(|v| selftest::parse_expectation(&v))
                .map(|e| ctx.expect.push(e)),
            "--only" => value("--only").and_then(|name| match selftest::find(&name) {
                Some(_) => {
                    only.push(name);
                    Ok(())
                }
                None => Err(format!("no scenario named `{name}`: --list shows them")),
            }),
            "--list" => {
                for s in selftest::SCENARIOS {
                    println!("{}", s.name);
                }
                return ExitCode::SUCCESS;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument `{other}`\n{USAGE}")),
        };
        if let Err(e) = r {
            eprintln!("podscope-kernel-tests: {e}");
            return ExitCode::from(2);
        }
    }
    match selftest::run_all(&ctx, &only, &mut std::io::stdout().lock()) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("podscope-kernel-tests: cannot write the results: {e}");
            ExitCode::from(1)
        }
    }
}
