//! The matrix's results: parsed from each kernel's output, printed as one
//! table (kernels × scenarios) with the exact error of every failure.

use std::{io::Write, time::Duration};

use super::Target;

/// The lines `podscope-kernel-tests` prints (agent/src/selftest/mod.rs).
pub const TEST_PREFIX: &str = "PODSCOPE-TEST ";
const SUMMARY_PREFIX: &str = "PODSCOPE-SUMMARY ";

/// One scenario's result on one kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct TestResult {
    pub name: String,
    /// pass, fail or skip.
    pub word: String,
    pub detail: String,
    /// Its time, where the run's output was timed as it came (the guests).
    pub seconds: Option<f64>,
}

/// One kernel's run.
#[derive(Clone, Debug, Default)]
pub struct Run {
    pub target: Option<Target>,
    /// The release the test binary reported (or the package booted).
    pub kernel: Option<String>,
    pub results: Vec<TestResult>,
    /// What went wrong with the run as a whole (no boot, crash, timeout).
    pub problem: Option<String>,
    pub wall: Duration,
    /// Time to userspace (VMs only).
    pub boot: Option<Duration>,
    /// The tests' own time, from the summary line.
    pub tests_seconds: Option<f64>,
    /// Why this run's skips are skips and not failures (the host column
    /// without root); None: a skip not expected by the target fails.
    pub skips_allowed: Option<String>,
}

impl Run {
    pub fn broken(problem: String) -> Run {
        Run {
            problem: Some(problem),
            ..Run::default()
        }
    }

    /// Reads the result and summary lines out of everything the run printed
    /// (a serial console also carries the kernel's and init's messages).
    pub fn parse(text: &str) -> Run {
        let mut run = Run::default();
        let mut summary = false;
        for line in text.lines() {
            if let Some(at) = line.find(TEST_PREFIX) {
                let rest = &line[at + TEST_PREFIX.len()..];
                let mut words = rest.splitn(3, ' ');
                let (Some(name), Some(word)) = (words.next(), words.next()) else {
                    continue;
                };
                run.results.push(TestResult {
                    name: name.to_string(),
                    word: word.to_string(),
                    detail: words.next().unwrap_or("").trim().to_string(),
                    seconds: None,
                });
            } else if let Some(at) = line.find(SUMMARY_PREFIX) {
                summary = true;
                for kv in line[at + SUMMARY_PREFIX.len()..].split_whitespace() {
                    match kv.split_once('=') {
                        Some(("kernel", v)) => run.kernel = Some(v.to_string()),
                        Some(("seconds", v)) => run.tests_seconds = v.parse().ok(),
                        _ => {}
                    }
                }
            }
        }
        if !summary {
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            run.problem = Some(format!(
                "the test binary did not finish (no summary line); its last output: {}",
                if tail.is_empty() {
                    "(none)".to_string()
                } else {
                    tail.join(" | ")
                }
            ));
        }
        run
    }

    fn name(&self) -> &str {
        self.target.map(|t| t.name).unwrap_or("?")
    }

    fn expected_skip(&self, scenario: &str) -> bool {
        self.target
            .is_some_and(|t| t.expected_skips.contains(&scenario))
    }
}

/// The matrix's counts, in the terms of `cargo xtask test`'s last line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub passed: u64,
    /// Failures, unexpected skips, missing results and broken runs.
    pub failed: u64,
    /// Expected skips.
    pub skipped: u64,
}

impl Totals {
    pub fn unexpected_failures(&self) -> u64 {
        self.failed
    }
}

/// A cell of the table, and whether it counts as a failure.
fn cell(run: &Run, scenario: &str) -> (&'static str, Option<String>) {
    match run.results.iter().find(|r| r.name == scenario) {
        Some(r) if r.word == "pass" => ("pass", None),
        Some(r) if r.word == "skip" && run.expected_skip(scenario) => ("expected-skip", None),
        Some(r) if r.word == "skip" && run.skips_allowed.is_some() => ("skip", None),
        Some(r) if r.word == "skip" => {
            ("SKIP", Some(format!("skipped unexpectedly: {}", r.detail)))
        }
        Some(r) => ("FAIL", Some(r.detail.clone())),
        None => ("MISSING", Some("no result".into())),
    }
}

/// Prints the table, the failures, and one line per kernel; returns the counts.
pub fn print(runs: &[Run], out: &mut dyn Write) -> std::io::Result<Totals> {
    let mut scenarios: Vec<&str> = vec![];
    for r in runs.iter().flat_map(|run| &run.results) {
        if !scenarios.contains(&r.name.as_str()) {
            scenarios.push(&r.name);
        }
    }
    let mut totals = Totals::default();
    let mut failures = vec![];
    writeln!(out)?;
    write!(out, "| scenario |")?;
    for run in runs {
        write!(out, " {} |", run.name())?;
    }
    writeln!(out)?;
    writeln!(out, "|---|{}", "---|".repeat(runs.len()))?;
    for s in &scenarios {
        write!(out, "| {s} |")?;
        for run in runs {
            let (word, failure) = cell(run, s);
            // A broken run's missing rows are one failure, reported below.
            if run.problem.is_some() && word == "MISSING" {
                write!(out, " – |")?;
                continue;
            }
            match run
                .results
                .iter()
                .find(|r| r.name == *s)
                .and_then(|r| r.seconds)
            {
                Some(t) => write!(out, " {word} {t:.1}s |")?,
                None => write!(out, " {word} |")?,
            }
            match (word, failure) {
                ("pass", _) => totals.passed += 1,
                ("expected-skip" | "skip", _) => totals.skipped += 1,
                (_, Some(f)) => {
                    totals.failed += 1;
                    failures.push(format!("{} / {s}: {f}", run.name()));
                }
                _ => {}
            }
        }
        writeln!(out)?;
    }
    write!(out, "| kernel |")?;
    for run in runs {
        write!(out, " {} |", run.kernel.as_deref().unwrap_or("?"))?;
    }
    writeln!(out)?;
    write!(out, "| wall time |")?;
    for run in runs {
        match run.boot {
            Some(b) => write!(
                out,
                " {:.1} s (boot {:.1} s) |",
                run.wall.as_secs_f64(),
                b.as_secs_f64()
            )?,
            None => write!(out, " {:.1} s |", run.wall.as_secs_f64())?,
        }
    }
    writeln!(out)?;
    for run in runs {
        if let Some(p) = &run.problem {
            totals.failed += 1;
            failures.push(format!("{}: {p}", run.name()));
        }
    }
    writeln!(out)?;
    for f in &failures {
        writeln!(out, "FAILED {f}")?;
    }
    for run in runs {
        if let Some(why) = &run.skips_allowed {
            writeln!(out, "SKIPPED {}: {why}", run.name())?;
        }
    }
    for run in runs {
        if let Some(sel) = run
            .results
            .iter()
            .find(|r| r.name == "exits_hook_selection")
        {
            writeln!(out, "{}: {}", run.name(), sel.detail)?;
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "[    1.0] random kernel line\n\
        PODSCOPE-BOOTED\n\
        PODSCOPE-TEST exit_code_3 pass exit_code=3 via tp_btf\n\
        junk PODSCOPE-TEST sigkill fail signal: got None, want Some(\"SIGKILL\")\n\
        PODSCOPE-TEST raw_tp_fallback skip needs root\n\
        PODSCOPE-SUMMARY kernel=6.1.0-56-cloud-amd64 passed=1 failed=1 skipped=1 seconds=4.5\n";

    #[test]
    fn parses_results_from_a_console() {
        let run = Run::parse(OUTPUT);
        assert_eq!(run.results.len(), 3);
        assert_eq!(run.results[1].word, "fail");
        assert_eq!(
            run.results[1].detail,
            "signal: got None, want Some(\"SIGKILL\")"
        );
        assert_eq!(run.kernel.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(run.tests_seconds, Some(4.5));
        assert!(run.problem.is_none());
    }

    #[test]
    fn a_run_without_summary_is_a_problem_with_its_last_output() {
        let run = Run::parse("Kernel panic - not syncing: foo\n");
        assert!(run.problem.unwrap().contains("Kernel panic"));
    }

    #[test]
    fn the_table_counts_failures_and_unexpected_skips() {
        let mut out = vec![];
        let totals = print(&[Run::parse(OUTPUT)], &mut out).unwrap();
        assert_eq!(
            totals,
            Totals {
                passed: 1,
                failed: 2,
                skipped: 0
            }
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("| exit_code_3 | pass |"), "{text}");
        assert!(
            text.contains("FAILED ? / sigkill: signal: got None"),
            "{text}"
        );
    }

    #[test]
    fn a_host_column_without_root_shows_its_skips() {
        let mut run = Run::parse(
            "PODSCOPE-TEST exit_code_3 skip needs root\nPODSCOPE-SUMMARY kernel=6.18 passed=0 failed=0 skipped=1 seconds=0.0\n",
        );
        let strict = print(std::slice::from_ref(&run), &mut vec![]).unwrap();
        assert_eq!(strict.failed, 1, "a skip is a failure unless allowed");
        run.skips_allowed = Some("not root".into());
        let mut out = vec![];
        let totals = print(&[run], &mut out).unwrap();
        assert_eq!((totals.failed, totals.skipped), (0, 1));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("| exit_code_3 | skip |"), "{text}");
        assert!(text.contains("SKIPPED ?: not root"), "{text}");
    }
}
