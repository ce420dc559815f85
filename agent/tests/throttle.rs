//! CPU throttling on real pods (the test node: containerd over CRI, hybrid
//! cgroups, CFS quotas from `resources.limits.cpu` as kubelet sets them),
//! through the podscope binary as a user runs it: `podscope trace throttle`
//! and `podscope top -o json`. Needs root and the test node.
//!
//! One pod, four containers, at the same time:
//! - `spinner`: one spinning thread under a 200m limit: throttled about every
//!   period for ~80 ms, as many periods as its cpu.stat counts (±1);
//! - `bursty`: 100 ms bursts on two threads every 700 ms under a 1500m limit:
//!   average usage ~0.3 cores, far below the limit, yet each burst can
//!   overrun the quota late in a period: short throttles (≤ 25 ms + latency);
//! - `unlimited` (no limit) and `under` (far under its limit): never throttled.

mod support;

use std::{io::Write, process::Command, time::Instant};

use serde_json::Value;
use support::{node, privileged, required, testnode};

const NS: &str = "podscope-throttle";
const POD: &str = "throttle-mix";
const SOCKET: &str = "/run/podscope-node/containerd.sock";

const MANIFEST: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: throttle-mix
  namespace: podscope-throttle
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: spinner
    command: ["podscope-helper", "spin", "1"]
    resources:
      limits:
        cpu: 200m
  - name: bursty
    command: ["podscope-helper", "burst", "2", "100", "700"]
    resources:
      limits:
        cpu: 1500m
  - name: unlimited
    command: ["podscope-helper", "burst", "1", "50", "500"]
  - name: under
    command: ["podscope-helper", "burst", "1", "20", "500"]
    resources:
      limits:
        cpu: "1"
"#;

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "throttle: {msg}");
}

fn podscope(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_podscope"))
        .args(args)
        .args(["--cri-socket", SOCKET])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podscope {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn throttling_in_real_pods_matches_cpu_stat() {
    if !privileged("throttling_in_real_pods_matches_cpu_stat") {
        return;
    }
    if testnode().is_none() {
        assert!(
            !required(),
            "podscope-testnode is not built: `cargo build --release -p testnode`"
        );
        support::say_skipped(
            "throttling_in_real_pods_matches_cpu_stat",
            "podscope-testnode is not built",
        );
        return;
    }
    node(&["up"]);
    let result = std::panic::catch_unwind(scenarios);
    let _ = Command::new(testnode().unwrap())
        .args(["delete", &format!("{NS}/{POD}")])
        .output();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn container<'a>(snapshot: &'a Value, name: &str) -> &'a Value {
    snapshot["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["container"] == name)
        .unwrap_or_else(|| panic!("no {name} in {snapshot}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Throttles with durations above `secs`, from the snapshot's histogram.
fn longer_than(snapshot: &Value, c: &Value, secs: f64) -> u64 {
    let bounds = snapshot["duration_buckets"].as_array().unwrap();
    let first = bounds
        .iter()
        .position(|b| b.as_f64().unwrap() > secs)
        .unwrap_or(bounds.len());
    c["measured"]["buckets"].as_array().unwrap()[first..]
        .iter()
        .map(u)
        .sum()
}

fn scenarios() {
    let dir = std::env::temp_dir().join(format!("podscope-throttle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pod.yaml");
    std::fs::write(&file, MANIFEST).unwrap();
    node(&["apply", "-f", file.to_str().unwrap(), "--wait", "running"]);
    let _ = std::fs::remove_dir_all(&dir);

    say("trace throttle: live events name the spinner, ~80 ms each");
    let t0 = Instant::now();
    let out = podscope(&[
        "trace",
        "throttle",
        "-o",
        "json",
        "--duration",
        "3s",
        "-n",
        NS,
    ]);
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let spinner: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "throttle" && e["pod"] == POD && e["container"] == "spinner")
        .collect();
    assert!(
        spinner.len() >= 10,
        "{} spinner throttles in {:?}: {out}",
        spinner.len(),
        t0.elapsed()
    );
    let mut ms: Vec<f64> = spinner
        .iter()
        .map(|e| e["duration_ns"].as_f64().unwrap() / 1e6)
        .collect();
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    assert!(
        (50.0..=100.0).contains(&median),
        "median spinner throttle {median:.1} ms, want ~80: {ms:?}"
    );
    assert!(
        events
            .iter()
            .all(|e| e["container"] != "unlimited" && e["container"] != "under"),
        "a container without or under its limit was reported throttled: {out}"
    );

    say("top -o json: the spinner first, counts as cpu.stat's, short bursts apart");
    let out = podscope(&["top", "-o", "json", "--interval", "10s", "-n", NS]);
    let snap: Value = serde_json::from_str(out.trim()).expect("one JSON snapshot");
    say(&format!("{snap}"));
    let first = &snap["containers"][0];
    assert_eq!(
        first["container"], "spinner",
        "most throttled first: {snap}"
    );

    let s = container(&snap, "spinner");
    let (measured, kernel) = (
        u(&s["measured"]["periods"]),
        u(&s["kernel"]["throttled_periods"]),
    );
    assert!(
        kernel >= 50,
        "spinner throttled in only {kernel} periods of ~100: {s}"
    );
    assert!(
        measured.abs_diff(kernel) <= 1,
        "spinner: measured {measured} periods, cpu.stat {kernel}: {s}"
    );
    assert_eq!(
        u(&s["measured"]["ancestor_throttles"]),
        0,
        "its own quota throttled it (there is no pod-level quota here): {s}"
    );
    assert!((s["kernel"]["limit_cores"].as_f64().unwrap() - 0.2).abs() < 1e-9);
    let throttles = u(&s["measured"]["throttles"]);
    assert!(
        longer_than(&snap, s, 0.05) * 10 >= throttles * 8,
        "most spinner throttles last 50-100 ms: {s}"
    );

    let b = container(&snap, "bursty");
    let (measured, kernel) = (
        u(&b["measured"]["periods"]),
        u(&b["kernel"]["throttled_periods"]),
    );
    assert!(kernel >= 1, "the bursty container was never throttled: {b}");
    assert!(
        measured.abs_diff(kernel) <= 1,
        "bursty: measured {measured} periods, cpu.stat {kernel}: {b}"
    );
    let window = snap["window_seconds"].as_f64().unwrap();
    let usage_cores = b["kernel"]["usage_ns"].as_f64().unwrap() / 1e9 / window;
    assert!(
        usage_cores < 0.5 * 1.5,
        "bursty average usage {usage_cores:.2} cores is not well below its 1.5 limit"
    );
    assert_eq!(
        longer_than(&snap, b, 0.05),
        0,
        "bursty throttles are short (the quota runs out late in a period): {b}"
    );

    for name in ["unlimited", "under"] {
        let c = container(&snap, name);
        assert_eq!(u(&c["measured"]["throttles"]), 0, "{name}: {c}");
        assert_eq!(u(&c["kernel"]["throttled_periods"]), 0, "{name}: {c}");
    }
    assert!(container(&snap, "unlimited")["kernel"]["limit_cores"].is_null());
}
