//! The test node as the node-scale benchmarks use it: brought up if it was
//! not, pods applied and remembered, the running ones counted, and on drop
//! every pod and Service this benchmark made deleted (the node itself
//! taken down only if this brought it up).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::NODE_SOCKET;
pub(crate) const BENCH_NS: &str = "podscope-bench";
pub(crate) const BENCH_PODS: usize = 100;

pub(crate) struct BenchNode {
    testnode: PathBuf,
    was_up: bool,
    dir: PathBuf,
    /// `NS/NAME` of the pods (and `service/NS/NAME` of the Services) this
    /// benchmark applied and has not deleted.
    made: Vec<String>,
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
            dir: std::env::temp_dir().join(format!("podscope-bench-node-{}", std::process::id())),
            made: vec![],
        };
        n.node(&["up"])?;
        std::fs::create_dir_all(&n.dir)?;
        Ok(n)
    }

    /// Applies one manifest (a Pod or a Service, whose `NS/NAME` or
    /// `service/NS/NAME` is `id`) and remembers it for deletion.
    pub(crate) fn apply(&mut self, id: &str, manifest: &str) -> Result<()> {
        let file = self.dir.join(format!("{}.yaml", id.replace('/', "_")));
        std::fs::write(&file, manifest)?;
        let applied = self.node(&["apply", "-f", file.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_file(&file);
        applied?;
        if !self.made.iter().any(|m| m == id) {
            self.made.push(id.to_string());
        }
        Ok(())
    }

    /// Deletes what `apply` made under `id` (`extra`: e.g. a grace period).
    pub(crate) fn delete(&mut self, id: &str, extra: &[&str]) {
        let mut args = vec!["delete", id];
        args.extend_from_slice(extra);
        let _ = self.node(&args);
        self.made.retain(|m| m != id);
    }

    /// Pods of `ns` this benchmark applied and has not deleted.
    pub(crate) fn made(&self, ns: &str) -> usize {
        self.made_in(ns).len()
    }

    /// Their names.
    pub(crate) fn made_in(&self, ns: &str) -> Vec<String> {
        self.made
            .iter()
            .filter_map(|m| m.strip_prefix(&format!("{ns}/")))
            .map(str::to_string)
            .collect()
    }

    /// Running containers of the pods in `ns` whose names start with `prefix`.
    pub(crate) fn running(&self, ns: &str, prefix: &str) -> usize {
        let status: serde_json::Value = self
            .node(&["status", "-o", "json"])
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        status
            .as_array()
            .map(|pods| {
                pods.iter()
                    .filter(|p| {
                        p["namespace"] == ns
                            && p["name"].as_str().is_some_and(|n| n.starts_with(prefix))
                    })
                    .flat_map(|p| p["containers"].as_array().cloned().unwrap_or_default())
                    .filter(|c| c["state"] == "running")
                    .count()
            })
            .unwrap_or(0)
    }

    /// Waits until `want` containers of those pods run; how long it took.
    pub(crate) fn wait_running(
        &self,
        ns: &str,
        prefix: &str,
        want: usize,
        limit: Duration,
    ) -> Result<Duration> {
        let t = Instant::now();
        loop {
            let running = self.running(ns, prefix);
            if running >= want {
                return Ok(t.elapsed());
            }
            if t.elapsed() > limit {
                bail!(
                    "only {running} of {want} containers ran within {} s",
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Deletes every pod of `ns` this benchmark made, at once (grace 0),
    /// and waits until the namespace is empty.
    pub(crate) fn clear(&mut self, ns: &str) -> Result<()> {
        let mine: Vec<String> = self
            .made
            .iter()
            .filter(|m| m.starts_with(&format!("{ns}/")))
            .cloned()
            .collect();
        for id in mine {
            self.delete(&id, &["--grace-period", "0"]);
        }
        let t = Instant::now();
        loop {
            let status: serde_json::Value =
                serde_json::from_str(&self.node(&["status", "-o", "json"])?).unwrap_or_default();
            let left = status
                .as_array()
                .map(|p| p.iter().filter(|p| p["namespace"] == ns).count())
                .unwrap_or(0);
            if left == 0 {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(300) {
                bail!("{left} pods still there after 300 s");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// 100 pods × 3 containers; each container runs `true` once (so each
    /// has an exit series) and then sleeps.
    pub(crate) fn fill(&mut self) -> Result<Duration> {
        let t = Instant::now();
        for i in 0..BENCH_PODS {
            let mut m = format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: {BENCH_NS}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n"
            );
            for c in ["app", "sidecar", "proxy"] {
                m.push_str(&format!(
                    "  - name: {c}\n    command: [\"sh\", \"-c\", \"/bin/true; exec sleep 3600\"]\n"
                ));
            }
            self.apply(&format!("{BENCH_NS}/p{i}"), &m)?;
        }
        self.wait_running(BENCH_NS, "", BENCH_PODS * 3, Duration::from_secs(300))?;
        Ok(t.elapsed())
    }
}

impl Drop for BenchNode {
    fn drop(&mut self) {
        for id in std::mem::take(&mut self.made) {
            let _ = self.node(&["delete", &id]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !self.was_up {
            let _ = self.node(&["down"]);
        }
    }
}
