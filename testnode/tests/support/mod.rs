//! Helpers shared by the test node's integration tests: run the binary,
//! read pod statuses, poll under a deadline.
#![allow(dead_code)]

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use testnode::{cri::Cri, paths, status::PodStatus};

pub const BIN: &str = env!("CARGO_BIN_EXE_podscope-testnode");

pub fn say(msg: &str) {
    // libtest captures print!/eprintln!, not writes to the stderr handle.
    let _ = writeln!(std::io::stderr(), "{msg}");
}

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pods")
}

pub fn node(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

/// Runs and requires success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = node(args);
    assert!(
        out.status.success(),
        "podscope-testnode {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn pod_json(args: &[&str]) -> PodStatus {
    let out = ok(args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not a pod status ({e}): {out}"))
}

pub fn status(pod: &str) -> PodStatus {
    pod_json(&["status", pod, "-o", "json"])
}

/// Polls the pod's status until `cond` holds.
pub fn wait_until(
    pod: &str,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&PodStatus) -> bool,
) -> PodStatus {
    let deadline = Instant::now() + timeout;
    loop {
        // The status file appears once the daemon has picked the manifest up.
        let out = node(&["status", pod, "-o", "json"]);
        let s: Option<PodStatus> = serde_json::from_slice(&out.stdout).ok();
        if let Some(s) = &s
            && cond(s)
        {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{pod}: timed out waiting for {what}; last status: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A copy of an example with a different name (and other edits).
pub fn variant(example: &str, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(examples().join(example)).expect("example manifest");
    for (from, to) in edits {
        assert!(text.contains(from), "{example} has no `{from}`");
        text = text.replace(from, to);
    }
    let p = std::env::temp_dir().join(format!(
        "podscope-testnode-{}-{example}",
        std::process::id()
    ));
    std::fs::write(&p, text).expect("write manifest");
    p
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio")
}

pub fn cri_container(id: &str) -> testnode::cri::api::ContainerStatus {
    rt().block_on(async {
        let mut cri = Cri::connect(paths::SOCKET).await.expect("CRI");
        cri.container_status(id).await.expect("ContainerStatus").0
    })
}

/// Root, or a visible SKIPPED line (a failure under PODSCOPE_REQUIRE_KERNEL_TESTS=1).
pub fn root_or_skip(what: &str) -> bool {
    if testnode::process::is_root() {
        return true;
    }
    if std::env::var("PODSCOPE_REQUIRE_KERNEL_TESTS").as_deref() == Ok("1") {
        panic!(
            "the {what} tests need root, and PODSCOPE_REQUIRE_KERNEL_TESTS=1 forbids skipping them"
        );
    }
    say(&format!(
        "SKIPPED {what}: needs root (real containerd, netns and cgroups)"
    ));
    false
}

pub type Scenario = (&'static str, fn());

/// Runs each scenario (those whose name contains `only`, when given),
/// reporting each; returns the names of those that failed.
pub fn run_scenarios(what: &str, scenarios: &[Scenario], only: Option<&str>) -> Vec<&'static str> {
    let mut failed = Vec::new();
    for (name, f) in scenarios {
        if only.is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let t = Instant::now();
        let r = std::panic::catch_unwind(f);
        say(&format!(
            "{what} scenario `{name}`: {} in {:.1}s",
            if r.is_ok() { "ok" } else { "FAILED" },
            t.elapsed().as_secs_f64()
        ));
        if r.is_err() {
            failed.push(*name);
        }
    }
    failed
}
