//! podscope's kernel-facing tests as a library, so that one piece of code
//! serves both `cargo test` (agent/tests/kernel.rs) and the static
//! `podscope-kernel-tests` binary that `cargo xtask vm-test` boots on other
//! kernels. Every scenario loads the real programs into the running kernel
//! and checks them against real processes, with the parent's own wait status
//! as the ground truth.
//!
//! The binary prints one line per scenario, then a summary; `cargo xtask
//! vm-test` parses exactly this format from a serial console:
//!
//! ```text
//! PODSCOPE-TEST <name> pass|fail|skip <detail on one line>
//! PODSCOPE-SUMMARY kernel=<release> passed=N failed=N skipped=N seconds=S
//! ```

mod cgroups;
mod exits;
pub mod helper;
mod net;
mod nlrules;
mod selection;
mod terminations;
mod throttle;
mod tracer;

use std::{fmt, path::PathBuf, time::Instant};

pub use tracer::Tracer;

use crate::kernel::privilege::Privileges;

/// Prefix of a scenario's result line.
pub const TEST_PREFIX: &str = "PODSCOPE-TEST";
/// Prefix of the final line.
pub const SUMMARY_PREFIX: &str = "PODSCOPE-SUMMARY";

/// What the scenarios need from their runner.
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// A binary that runs [`helper`] workloads when given `--helper MODE`
    /// (the kernel-test binary itself): a workload of our own, because the
    /// VMs have busybox and nothing else.
    pub helper: PathBuf,
    /// What this kernel is known to allow, as `name=value` pairs checked by
    /// the hook-selection scenario: `exits=raw_tp`, `fentry=ok`, `kprobe=refused`.
    pub expect: Vec<(String, String)>,
}

/// How a scenario ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    Fail(String),
    Skip(String),
}

impl Outcome {
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Pass(_) => "pass",
            Outcome::Fail(_) => "fail",
            Outcome::Skip(_) => "skip",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            Outcome::Pass(d) | Outcome::Fail(d) | Outcome::Skip(d) => d,
        }
    }
}

/// Why a scenario stopped early: it failed, or it cannot run here.
#[derive(Debug)]
pub enum Stop {
    Fail(String),
    Skip(String),
}

impl<E: std::error::Error> From<E> for Stop {
    fn from(e: E) -> Stop {
        Stop::Fail(crate::probes::error_chain(&e))
    }
}

/// A scenario's result: a short detail on success.
pub type Verdict = Result<String, Stop>;

/// Fails the scenario with a formatted message.
macro_rules! fail {
    ($($arg:tt)*) => { return Err($crate::selftest::Stop::Fail(format!($($arg)*))) };
}
/// Fails the scenario unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => { if !$cond { fail!($($arg)*) } };
}
/// Fails the scenario unless `got == want`, saying what was compared.
macro_rules! ensure_eq {
    ($got:expr, $want:expr, $what:expr) => {{
        let (got, want) = (&$got, &$want);
        if got != want {
            fail!("{}: got {:?}, want {:?}", $what, got, want)
        }
    }};
}
pub(crate) use {ensure, ensure_eq, fail};

/// One named check.
pub struct Scenario {
    pub name: &'static str,
    run: fn(&Context) -> Verdict,
}

impl fmt::Debug for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// Every scenario, in the order the binary runs them.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "exits_hook_selection",
        run: selection::exits_hook_selection,
    },
    Scenario {
        name: "doctor_reports_the_choice",
        run: selection::doctor_reports_the_choice,
    },
    Scenario {
        name: "exit_code_3",
        run: exits::exit_code_3,
    },
    Scenario {
        name: "sigkill",
        run: exits::sigkill,
    },
    Scenario {
        name: "default_sigterm",
        run: exits::default_sigterm,
    },
    Scenario {
        name: "sigsegv_core_flag",
        run: exits::sigsegv_core_flag,
    },
    Scenario {
        name: "lone_thread_exit",
        run: exits::lone_thread_exit,
    },
    Scenario {
        name: "multithreaded_process_exit",
        run: exits::multithreaded_process_exit,
    },
    Scenario {
        name: "plain_tracepoint_fallback",
        run: exits::plain_tracepoint_fallback,
    },
    Scenario {
        name: "tp_btf_fallback",
        run: exits::tp_btf_fallback,
    },
    Scenario {
        name: "ten_thousand_processes",
        run: exits::ten_thousand_processes,
    },
    Scenario {
        name: "cgroup_mkdir_rmdir",
        run: cgroups::cgroup_mkdir_rmdir,
    },
    Scenario {
        name: "cgroup_first_exec",
        run: terminations::cgroup_first_exec,
    },
    Scenario {
        name: "signal_sender_and_target",
        run: terminations::signal_sender_and_target,
    },
    Scenario {
        name: "signal_fault_origin",
        run: terminations::signal_fault_origin,
    },
    Scenario {
        name: "oom_victim_and_scope",
        run: terminations::oom_victim_and_scope,
    },
    Scenario {
        name: "net_paths",
        run: net::net_paths,
    },
    Scenario {
        name: "throttle_matches_cpu_stat",
        run: throttle::throttled_cgroup_matches_cpu_stat,
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// Runs one scenario; a panic inside it (a bug in the test, or in podscope)
/// is a failure with its message, not the end of the whole run.
pub fn run(scenario: &Scenario, ctx: &Context) -> Outcome {
    if !Privileges::current().can_trace() {
        return Outcome::Skip("needs root (or CAP_BPF+CAP_PERFMON) to load eBPF programs".into());
    }
    match std::panic::catch_unwind(|| (scenario.run)(ctx)) {
        Ok(Ok(detail)) => Outcome::Pass(detail),
        Ok(Err(Stop::Fail(e))) => Outcome::Fail(e),
        Ok(Err(Stop::Skip(e))) => Outcome::Skip(e),
        Err(panic) => Outcome::Fail(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        )),
    }
}

/// A scenario's result line.
pub fn result_line(name: &str, outcome: &Outcome) -> String {
    let detail: String = outcome
        .detail()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("{TEST_PREFIX} {name} {} {detail}", outcome.word())
}

/// Runs the scenarios (all, or those named in `only`), printing each line
/// as it finishes and the summary last; returns the number of failures.
pub fn run_all(
    ctx: &Context,
    only: &[String],
    out: &mut dyn std::io::Write,
) -> std::io::Result<u32> {
    let start = Instant::now();
    let mut counts = [0u32; 3];
    for s in SCENARIOS
        .iter()
        .filter(|s| only.is_empty() || only.iter().any(|o| o == s.name))
    {
        let outcome = run(s, ctx);
        counts[match outcome {
            Outcome::Pass(_) => 0,
            Outcome::Fail(_) => 1,
            Outcome::Skip(_) => 2,
        }] += 1;
        writeln!(out, "{}", result_line(s.name, &outcome))?;
        out.flush()?;
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    writeln!(
        out,
        "{SUMMARY_PREFIX} kernel={kernel} passed={} failed={} skipped={} seconds={:.1}",
        counts[0],
        counts[1],
        counts[2],
        start.elapsed().as_secs_f64()
    )?;
    out.flush()?;
    Ok(counts[1])
}

/// Parses `name=value` expectations.
pub fn parse_expectation(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .ok_or_else(|| {
            format!("`{s}` is not an expectation: write NAME=VALUE, e.g. exits=tp_btf or fentry=ok")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_one_line_each() {
        let l = result_line("x", &Outcome::Fail("a\nb".into()));
        assert_eq!(l, "PODSCOPE-TEST x fail a b");
        assert_eq!(
            result_line("y", &Outcome::Pass(String::new())),
            "PODSCOPE-TEST y pass "
        );
    }

    #[test]
    fn names_are_unique_and_single_words() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            assert!(!s.name.contains(char::is_whitespace));
            assert!(
                SCENARIOS[..i].iter().all(|o| o.name != s.name),
                "{}",
                s.name
            );
        }
    }

    #[test]
    fn expectations_parse() {
        assert_eq!(
            parse_expectation("exits=tp_btf").unwrap(),
            ("exits".into(), "tp_btf".into())
        );
        assert!(
            parse_expectation("exits")
                .unwrap_err()
                .contains("NAME=VALUE")
        );
        assert!(parse_expectation("=x").is_err());
    }
}
