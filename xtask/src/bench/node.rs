//! The test node filled with 100 pods × 3 containers, for the benchmarks
//! that measure podscope at a node's scale.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::NODE_SOCKET;
pub(crate) const BENCH_NS: &str = "podscope-bench";
pub(crate) const BENCH_PODS: usize = 100;

/// The test node with 100 pods x 3 containers, removed again on drop
/// (the node itself only if this brought it up).
pub(crate) struct BenchNode {
    testnode: PathBuf,
    was_up: bool,
    dir: PathBuf,
}

impl BenchNode {
    pub(crate) fn node(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.testnode).args(args).output()?;
        if !out.status.success() {
            bail!(
                "podscope-testnode {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(crate) fn up() -> Result<BenchNode> {
        crate::status(crate::cargo().args(["build", "--release", "--quiet", "-p", "testnode"]))?;
        let n = BenchNode {
            testnode: crate::root().join("target/release/podscope-testnode"),
            was_up: Path::new(NODE_SOCKET).exists(),
            dir: std::env::temp_dir().join(format!("podscope-bench-pods-{}", std::process::id())),
        };
        n.node(&["up"])?;
        std::fs::create_dir_all(&n.dir)?;
        Ok(n)
    }

    /// Every container starts `sh`, which runs `true` once (so each has an
    /// exit series) and then sleeps.
    pub(crate) fn fill(&self) -> Result<Duration> {
        let t = Instant::now();
        for i in 0..BENCH_PODS {
            let file = self.dir.join(format!("p{i}.yaml"));
            let mut m = format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: {BENCH_NS}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n"
            );
            for c in ["app", "sidecar", "proxy"] {
                m.push_str(&format!(
                    "  - name: {c}\n    command: [\"sh\", \"-c\", \"/bin/true; exec sleep 3600\"]\n"
                ));
            }
            std::fs::write(&file, m)?;
            self.node(&["apply", "-f", file.to_str().unwrap_or_default()])?;
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let status: serde_json::Value =
                serde_json::from_str(&self.node(&["status", "-o", "json"])?).unwrap_or_default();
            let running = status
                .as_array()
                .map(|pods| {
                    pods.iter()
                        .filter(|p| p["namespace"] == BENCH_NS)
                        .flat_map(|p| p["containers"].as_array().cloned().unwrap_or_default())
                        .filter(|c| c["state"] == "running")
                        .count()
                })
                .unwrap_or(0);
            if running >= BENCH_PODS * 3 {
                return Ok(t.elapsed());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {running} of {} containers ran within 300 s",
                    BENCH_PODS * 3
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for BenchNode {
    fn drop(&mut self) {
        for i in 0..BENCH_PODS {
            let _ = self.node(&["delete", &format!("{BENCH_NS}/p{i}")]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !self.was_up {
            let _ = self.node(&["down"]);
        }
    }
}
