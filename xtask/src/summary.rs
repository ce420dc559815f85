//! What `cargo xtask test` proved, layer by layer.
//!
//! `cargo test`'s own counts overstate it: a test that cannot run (no root,
//! no test node, a missing tool) prints `SKIPPED <test>: <why>` on stderr and
//! returns, and libtest counts it as passed. This reads cargo's merged output
//! (stdout and stderr through one pipe, so a skip line falls between its
//! binary's `Running` line and its `test result:` line), moves every skipped
//! test from passed to skipped, and sorts the counts into layers: unit,
//! kernel, pods, deploy, and the kernel matrix per kernel. When tests are
//! required (root, own test node), a skip is a failure.

use std::io::Write;

use crate::vm;

/// The layers, in the order they are printed.
pub const LAYERS: &[&str] = &["unit", "kernel", "pods", "deploy"];

/// The layer of a test binary, from cargo's `Running <source> (<path>)` line.
fn layer_of(source: &str) -> &'static str {
    let file = source.rsplit('/').next().unwrap_or(source);
    match source {
        s if s.starts_with("unittests") => "unit",
        // The probes on this kernel, without a container runtime.
        _ if [
            "kernel.rs",
            "cgroups.rs",
            "cli.rs",
            "drain.rs",
            "exit_hooks.rs",
        ]
        .contains(&file) =>
        {
            "kernel"
        }
        // deploy/tests/manifests.rs: the manifests against the schemas and tools.
        _ if file == "manifests.rs" => "deploy",
        // Everything else runs real pods on the test node.
        _ => "pods",
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
    }
}

/// The running tally of one `cargo test` run.
#[derive(Debug, Default)]
pub struct Tally {
    /// Tests must not skip (root on its own test node).
    required: bool,
    layers: Vec<(String, Counts)>,
    /// The binary being run: its layer and the tests that said SKIPPED.
    current: Option<(&'static str, Vec<String>)>,
    /// `layer / test: why` of every skip, for the report.
    pub skips: Vec<String>,
    /// `PARTIAL <test>: <what>` lines: a test that ran, one part of it
    /// checked another way (e.g. a tool built without a feature). Listed,
    /// neither skipped nor failed.
    pub partial: Vec<String>,
    /// `layer / panic` of every test that panicked, trimmed to the lines
    /// that say why: repeated at the end, where a CI log's tail shows them.
    pub failures: Vec<String>,
    /// The panic being read: its layer and lines so far.
    panic: Option<(&'static str, Vec<String>)>,
}

impl Tally {
    pub fn new(required: bool) -> Tally {
        Tally {
            required,
            layers: LAYERS
                .iter()
                .map(|l| (l.to_string(), Counts::default()))
                .collect(),
            ..Tally::default()
        }
    }

    fn layer(&mut self, name: &str) -> &mut Counts {
        if !self.layers.iter().any(|(l, _)| l == name) {
            self.layers.push((name.to_string(), Counts::default()));
        }
        let i = self.layers.iter().position(|(l, _)| l == name).unwrap_or(0);
        &mut self.layers[i].1
    }

    /// Feeds one line of cargo's merged output.
    pub fn line(&mut self, line: &str) {
        let t = line.trim();
        if self.panic.is_some() {
            // A panic's message ends where libtest or the backtrace speaks.
            let ends = t.is_empty()
                || t.starts_with("note: run with")
                || t.starts_with("stack backtrace:")
                || t.starts_with("---- ")
                || t.starts_with("test ")
                || t.starts_with("failures:");
            if !ends {
                if let Some((_, lines)) = &mut self.panic {
                    lines.push(line.trim_end().to_string());
                }
                return;
            }
            self.end_panic();
        }
        if t.starts_with("thread '") && t.contains("' panicked at ") {
            let layer = self.current.as_ref().map(|c| c.0).unwrap_or("unit");
            self.panic = Some((layer, vec![t.to_string()]));
            return;
        }
        if let Some(rest) = t.strip_prefix("Running ") {
            let source = rest.split(" (").next().unwrap_or(rest);
            self.current = Some((layer_of(source), vec![]));
        } else if t.starts_with("Doc-tests ") {
            self.current = Some(("unit", vec![]));
        } else if let Some(rest) = t.strip_prefix("SKIPPED ") {
            let (test, why) = rest.split_once(": ").unwrap_or((rest, ""));
            let layer = self.current.as_ref().map(|c| c.0).unwrap_or("unit");
            self.skips.push(format!("{layer} / {test}: {why}"));
            if let Some((_, tests)) = &mut self.current
                && !tests.iter().any(|x| x == test)
            {
                tests.push(test.to_string());
            }
        } else if let Some(rest) = t.strip_prefix("PARTIAL ") {
            let layer = self.current.as_ref().map(|c| c.0).unwrap_or("unit");
            self.partial.push(format!("{layer} / {rest}"));
        } else if let Some(rest) = t.strip_prefix("test result: ") {
            let (layer, skipped) = self
                .current
                .take()
                .map(|(l, s)| (l, s.len() as u64))
                .unwrap_or(("unit", 0));
            let passed = count_before(rest, "passed");
            // A skipped test returned early, so libtest counted it as passed.
            let runtime_skips = skipped.min(passed);
            let mut c = Counts {
                passed: passed - runtime_skips,
                failed: count_before(rest, "failed"),
                skipped: count_before(rest, "ignored"),
            };
            if self.required {
                c.failed += runtime_skips;
            } else {
                c.skipped += runtime_skips;
            }
            self.layer(layer).add(&c);
        }
    }

    /// Keeps the panic just read: its first lines (where and what) and its
    /// last (an assertion's left and right come after a long message).
    fn end_panic(&mut self) {
        let Some((layer, lines)) = self.panic.take() else {
            return;
        };
        const HEAD: usize = 4;
        const TAIL: usize = 4;
        let kept: Vec<String> = if lines.len() <= HEAD + TAIL + 1 {
            lines
        } else {
            let mut k = lines[..HEAD].to_vec();
            k.push(format!("    [… {} lines …]", lines.len() - HEAD - TAIL));
            k.extend_from_slice(&lines[lines.len() - TAIL..]);
            k
        };
        let text: Vec<String> = kept
            .iter()
            .map(|l| {
                let mut l = l.clone();
                if l.len() > 400 {
                    let mut cut = 400;
                    while !l.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    l.truncate(cut);
                    l.push('…');
                }
                l
            })
            .collect();
        self.failures
            .push(format!("{layer} / {}", text.join("\n    ")));
    }

    /// One kernel of the matrix.
    pub fn matrix(&mut self, kernel: &str, t: &vm::Totals) {
        self.layer(&format!("matrix {kernel}")).add(&Counts {
            passed: t.passed,
            failed: t.failed,
            skipped: t.skipped,
        });
    }

    /// The fuzz smoke run: one test per target.
    pub fn fuzz(&mut self, passed: u64, failed: u64) {
        self.layer("fuzz").add(&Counts {
            passed,
            failed,
            skipped: 0,
        });
    }

    /// A layer of named checks run by xtask itself (the soak): each passes
    /// or fails with a reason, printed as it is counted.
    pub fn checks(
        &mut self,
        layer: &str,
        results: &[(&str, Result<(), String>)],
        out: &mut dyn Write,
    ) -> std::io::Result<()> {
        for (name, verdict) in results {
            match verdict {
                Ok(()) => writeln!(out, "{layer} / {name} ... ok")?,
                Err(why) => writeln!(out, "{layer} / {name} ... FAILED: {why}")?,
            }
        }
        let failed = results.iter().filter(|(_, v)| v.is_err()).count() as u64;
        self.layer(layer).add(&Counts {
            passed: results.len() as u64 - failed,
            failed,
            skipped: 0,
        });
        Ok(())
    }

    /// A layer that could not run here (not root): one skip.
    pub fn skipped(&mut self, layer: &str) {
        self.layer(layer).skipped += 1;
    }

    /// A layer that could not run at all: one failure.
    pub fn broken(&mut self, layer: &str) {
        self.layer(layer).failed += 1;
    }

    pub fn total(&self) -> Counts {
        let mut all = Counts::default();
        for (_, c) in &self.layers {
            all.add(c);
        }
        all
    }

    /// The skips, the breakdown, and the one summary line last.
    pub fn print(&self, out: &mut dyn Write) -> std::io::Result<Counts> {
        writeln!(out)?;
        for f in &self.failures {
            writeln!(out, "panicked: {f}")?;
        }
        for p in &self.partial {
            writeln!(out, "partly checked: {p}")?;
        }
        for s in &self.skips {
            let word = if self.required {
                "FAILED (skipped, but tests are required)"
            } else {
                "skipped"
            };
            writeln!(out, "{word}: {s}")?;
        }
        for (layer, c) in &self.layers {
            writeln!(
                out,
                "  {layer:<18} {:>4} passed {:>3} failed {:>3} skipped",
                c.passed, c.failed, c.skipped
            )?;
        }
        let all = self.total();
        writeln!(
            out,
            "tests: {} passed, {} failed, {} skipped",
            all.passed, all.failed, all.skipped
        )?;
        Ok(all)
    }
}

/// In "ok. 8 passed; 0 failed; ...", the number before `word`.
fn count_before(s: &str, word: &str) -> u64 {
    let words: Vec<&str> = s.split([' ', ';']).filter(|w| !w.is_empty()).collect();
    words
        .windows(2)
        .find(|w| w[1] == word)
        .and_then(|w| w[0].parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cargo's merged output, as recorded (trimmed) from a run without root.
    const OUTPUT: &str = "\
     Running unittests src/lib.rs (target/release/deps/podscope-0123)
test result: ok. 120 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.50s
     Running tests/kernel.rs (target/release/deps/kernel-4567)
SKIPPED sigkill: needs root (or CAP_BPF+CAP_PERFMON) to load eBPF programs
SKIPPED exit_code_3: needs root (or CAP_BPF+CAP_PERFMON) to load eBPF programs
test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s
     Running tests/pods.rs (target/release/deps/pods-89ab)
SKIPPED pod attribution: podscope-testnode is not built
SKIPPED pod attribution: podscope-testnode is not built
test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s
     Running tests/manifests.rs (target/release/deps/manifests-cdef)
PARTIAL readme_scrape_config: one section checked by assertions, not by promtool
test result: ok. 7 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 2.00s
   Doc-tests podscope
test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s
";

    fn tally(required: bool) -> Tally {
        let mut t = Tally::new(required);
        for l in OUTPUT.lines() {
            t.line(l);
        }
        t.matrix(
            "6.1-cloud",
            &vm::Totals {
                passed: 17,
                failed: 0,
                skipped: 1,
            },
        );
        t
    }

    fn layer(t: &Tally, name: &str) -> Counts {
        t.layers.iter().find(|(l, _)| l == name).unwrap().1.clone()
    }

    #[test]
    fn a_runtime_skip_is_counted_as_skipped_not_passed() {
        let t = tally(false);
        let c = |passed, failed, skipped| Counts {
            passed,
            failed,
            skipped,
        };
        assert_eq!(layer(&t, "unit"), c(120, 0, 0));
        assert_eq!(layer(&t, "kernel"), c(1, 0, 2));
        // One test said SKIPPED twice: one skip.
        assert_eq!(layer(&t, "pods"), c(0, 1, 1));
        assert_eq!(layer(&t, "deploy"), c(7, 0, 1));
        assert_eq!(layer(&t, "matrix 6.1-cloud"), c(17, 0, 1));
        assert_eq!(t.total(), c(145, 1, 5));
        assert_eq!(t.skips.len(), 4);
        assert!(t.skips[0].starts_with("kernel / sigkill: needs root"));
    }

    #[test]
    fn a_panic_is_repeated_at_the_end_with_its_left_and_right() {
        let mut t = Tally::new(true);
        let mut output = String::from(
            "     Running tests/triggers.rs (target/release/deps/triggers-1)\n\
             thread 'network_probes' panicked at agent/tests/triggers.rs:282:5:\n\
             assertion `left == right` failed: {\n",
        );
        for i in 0..50 {
            output.push_str(&format!("  \"field{i}\": {i},\n"));
        }
        output.push_str(
            "}\n  left: \"none\"\n right: \"liveness_probe\"\n\
             note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n\
             test network_probes ... FAILED\n\
             test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s\n",
        );
        for l in output.lines() {
            t.line(l);
        }
        assert_eq!(t.failures.len(), 1, "{:?}", t.failures);
        let f = &t.failures[0];
        assert!(
            f.starts_with(
                "pods / thread 'network_probes' panicked at agent/tests/triggers.rs:282:5:"
            ),
            "{f}"
        );
        assert!(f.contains("right: \"liveness_probe\""), "{f}");
        assert!(!f.contains("field20"), "the middle is left out: {f}");
        assert_eq!(layer(&t, "pods").failed, 1);
        let mut out = vec![];
        t.print(&mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("panicked: pods / thread 'network_probes'"),
            "{out}"
        );
    }

    #[test]
    fn when_tests_are_required_a_skip_is_a_failure() {
        let t = tally(true);
        assert_eq!(
            layer(&t, "kernel"),
            Counts {
                passed: 1,
                failed: 2,
                skipped: 0
            }
        );
        let mut out = vec![];
        let all = t.print(&mut out).unwrap();
        assert_eq!(all.failed, 4);
        let out = String::from_utf8(out).unwrap();
        let last = out.lines().last().unwrap();
        assert_eq!(last, "tests: 145 passed, 4 failed, 2 skipped");
        assert!(out.contains("FAILED (skipped, but tests are required): kernel / sigkill"));
        assert!(out.contains("  matrix 6.1-cloud"), "{out}");
        assert!(
            out.contains("partly checked: deploy / readme_scrape_config: one section"),
            "{out}"
        );
    }
}
