//! The test node against real containerd, runc and CNI (needs root).
//!
//! One test function runs every scenario in sequence on one node: the
//! scenarios share a containerd and its network namespace, so they must not
//! run in parallel, and `down` must come last and always run. A failing
//! scenario is reported and the others still run; `down` is checked at the
//! end whatever happened.
//!
//! Without root this prints a visible SKIPPED line and passes, unless
//! PODSCOPE_REQUIRE_KERNEL_TESTS=1 (then it fails).

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use testnode::{
    cleanup,
    cri::Cri,
    paths,
    status::{Phase, PodStatus},
};

mod support;
use support::*;

fn scenario_up_is_idempotent() {
    let t = Instant::now();
    let first = ok(&["up"]);
    let pid = testnode::containerd::running().expect("containerd runs after up");
    let second = ok(&["up"]);
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "up took {:?}",
        t.elapsed()
    );
    assert_eq!(
        testnode::containerd::running(),
        Some(pid),
        "a second up restarted containerd"
    );
    assert!(
        second.contains("network namespace podscope-node exists"),
        "{second}"
    );
    assert!(second.contains("already imported"), "{second}");
    assert!(second.contains("kubelet daemon runs"), "{second}");
    assert!(first.contains("the test node is up"), "{first}");
}

fn scenario_exit_nonzero_restarts() {
    let on_failure = examples().join("exit-nonzero.yaml");
    let always = variant(
        "exit-nonzero.yaml",
        &[
            ("name: exit-nonzero\n", "name: exit-nonzero-always\n"),
            ("restartPolicy: OnFailure", "restartPolicy: Always"),
        ],
    );
    ok(&["apply", "-f", on_failure.to_str().unwrap()]);
    ok(&["apply", "-f", always.to_str().unwrap()]);
    for pod in ["examples/exit-nonzero", "examples/exit-nonzero-always"] {
        let s = wait_until(pod, Duration::from_secs(30), "two restarts", |s| {
            s.containers[0].restart_count >= 2
        });
        let c = &s.containers[0];
        let last = c
            .last_termination
            .as_ref()
            .expect("a restarted container has a last termination");
        assert_eq!(last.exit_code, 3, "{s:#?}");
        assert_eq!(last.reason.as_deref(), Some("Error"), "{s:#?}");
        assert_eq!(c.attempt, c.restart_count, "{s:#?}");
        assert_eq!(s.phase, Phase::Running, "{s:#?}");
        // CRI has the attempt and kubelet's restart annotation on the current container.
        let id = c.container_id.clone().expect("current container id");
        let cri = cri_container(&id);
        assert_eq!(cri.metadata.as_ref().map(|m| m.attempt), Some(c.attempt));
        assert_eq!(cri.labels["io.kubernetes.container.name"], "worker");
        assert_eq!(
            cri.annotations["io.kubernetes.container.restartCount"],
            c.attempt.to_string()
        );
        ok(&["delete", pod, "--wait"]);
    }
    // Never: exits once, stays exited, the pod fails.
    let never = variant(
        "exit-nonzero.yaml",
        &[
            ("name: exit-nonzero\n", "name: exit-nonzero-never\n"),
            ("restartPolicy: OnFailure", "restartPolicy: Never"),
        ],
    );
    let s = pod_json(&[
        "apply",
        "-f",
        never.to_str().unwrap(),
        "--wait",
        "exited",
        "-o",
        "json",
    ]);
    assert_eq!(s.containers[0].exit_code, Some(3), "{s:#?}");
    std::thread::sleep(Duration::from_millis(1500));
    let s = status("examples/exit-nonzero-never");
    assert_eq!(
        (s.phase, s.containers[0].restart_count),
        (Phase::Failed, 0),
        "{s:#?}"
    );
    ok(&["delete", "examples/exit-nonzero-never", "--wait"]);
    for p in [always, never] {
        let _ = std::fs::remove_file(p);
    }
}

fn scenario_oom_killed() {
    let f = examples().join("oom.yaml");
    let s = pod_json(&[
        "apply",
        "-f",
        f.to_str().unwrap(),
        "--wait",
        "exited",
        "-o",
        "json",
    ]);
    let c = &s.containers[0];
    assert_eq!(
        (c.exit_code, c.reason.as_deref()),
        (Some(137), Some("OOMKilled")),
        "{s:#?}"
    );
    assert_eq!(s.qos_class, testnode::qos::QosClass::Burstable);
    assert!(
        s.cgroup_parent.starts_with("/kubepods/burstable/pod"),
        "{s:#?}"
    );
    // Straight from CRI, not only from our status file.
    let cri = cri_container(c.container_id.as_deref().expect("id"));
    assert_eq!((cri.exit_code, cri.reason.as_str()), (137, "OOMKilled"));
    ok(&["delete", "examples/oom", "--wait"]);
}

/// SIGTERM, outlived, then SIGKILL once the grace period ran out: the
/// example's container, with a handler that renames the process
/// (`got-sigterm`) instead of ignoring the signal, so that its arrival shows.
fn scenario_ignores_sigterm() {
    let f = variant(
        "ignores-sigterm.yaml",
        &[("\"sigterm\", \"ignore\"]", "\"sigterm\", \"outlive\"]")],
    );
    let s = pod_json(&[
        "apply",
        "-f",
        f.to_str().unwrap(),
        "--wait",
        "running",
        "-o",
        "json",
    ]);
    let _ = std::fs::remove_file(&f);
    assert_eq!(s.termination_grace_period_seconds, 3);
    let pid = s.container("stubborn").and_then(|c| c.pid).expect("pid");
    let proc_file =
        |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
    // The handler is installed (SigCgt has SIGTERM, bit 14) before the stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while proc_file("status")
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_none_or(|m| m & (1 << 14) == 0)
    {
        assert!(
            Instant::now() < deadline,
            "the SIGTERM handler was never installed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let delete = Command::new(BIN)
        .args(["delete", "examples/ignores-sigterm", "--wait", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("delete");
    // SIGTERM arrives and the process lives on past it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while proc_file("comm").trim() != "got-sigterm" {
        assert!(
            Instant::now() < deadline,
            "no SIGTERM reached the container"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let state = proc_file("stat");
    assert!(
        !state.is_empty() && !state.contains(") Z"),
        "the container did not outlive SIGTERM: {state:?}"
    );
    let out = delete.wait_with_output().expect("delete");
    assert!(out.status.success(), "{out:?}");
    let s: PodStatus = serde_json::from_slice(&out.stdout).expect("status JSON");
    // An outer limit only a hang would reach.
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "delete took {:?}",
        t.elapsed()
    );
    assert_eq!(s.phase, Phase::Deleted);
    assert_eq!(
        s.containers[0].exit_code,
        Some(137),
        "ended by SIGKILL after outliving SIGTERM: {s:#?}"
    );
}

fn scenario_background_dies() {
    let f = examples().join("background-dies.yaml");
    ok(&["apply", "-f", f.to_str().unwrap(), "--wait", "running"]);
    // Both background events have happened once none of their processes
    // (the sleeps before them, the victim, the crasher) is left.
    let commands = || {
        let ps = ok(&["exec", "examples/background-dies", "app", "--", "ps"]);
        let commands: Vec<String> = ps
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
            .collect();
        (ps, commands)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ps, commands) = commands();
        if !commands.iter().any(|c| {
            ["sleep 1000", "sleep 2", "sleep 3"].contains(&c.as_str())
                || c.starts_with("podscope-helper crash")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the background processes should be gone:\n{ps}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = status("examples/background-dies");
    let c = &s.containers[0];
    assert_eq!(
        (c.state.as_str(), c.restart_count),
        ("running", 0),
        "PID 1 keeps running: {s:#?}"
    );
    ok(&["delete", "examples/background-dies", "--wait"]);
}

fn scenario_kubelet_like_pod() {
    let f = variant(
        "ignores-sigterm.yaml",
        &[
            ("name: ignores-sigterm\n", "name: shaped\n"),
            ("namespace: examples", "namespace: shop"),
            (
                "terminationGracePeriodSeconds: 3\n",
                "terminationGracePeriodSeconds: 1\n  shareProcessNamespace: true\n",
            ),
            (
                "    command: [\"podscope-helper\", \"sigterm\", \"ignore\"]\n",
                "    command: [\"podscope-helper\", \"sigterm\", \"handle\"]\n    env: [{name: GREETING, value: hello}]\n    resources: {requests: {cpu: 250m, memory: 16Mi}, limits: {cpu: 500m, memory: 64Mi}}\n  - name: side\n    command: [\"sleep\", \"1000\"]\n",
            ),
        ],
    );
    let s = pod_json(&[
        "apply",
        "-f",
        f.to_str().unwrap(),
        "--wait",
        "running",
        "-o",
        "json",
    ]);
    let ip = s.pod_ip.clone().expect("pod IP");
    assert!(
        ip.starts_with("198.18."),
        "pod IP {ip} outside 198.18.0.0/16"
    );
    assert_eq!(s.qos_class, testnode::qos::QosClass::Burstable);
    let c = s.container("stubborn").expect("container");
    let cg = c.cgroups_path.clone().expect("cgroups path");
    assert_eq!(
        cg,
        format!("{}/{}", s.cgroup_parent, c.container_id.as_deref().unwrap())
    );
    // kubelet's resources reached the cgroup: v1 cpu and memory where the
    // controllers are in v1 (hybrid, as here), else v2's cpu.max and
    // memory.max; one of the two must hold them.
    let rel = cg.trim_start_matches('/');
    let read = |p: &Path| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let v1 = Path::new("/sys/fs/cgroup/cpu").join(rel);
    let v2 = Path::new("/sys/fs/cgroup").join(rel);
    if v1.join("cpu.cfs_quota_us").exists() {
        assert_eq!(read(&v1.join("cpu.cfs_quota_us")).unwrap(), "50000");
        let mem = Path::new("/sys/fs/cgroup/memory").join(rel);
        let limit = read(&mem.join("memory.limit_in_bytes")).unwrap();
        assert_eq!(limit, (64u64 << 20).to_string());
    } else if v2.join("cpu.max").exists() {
        assert_eq!(read(&v2.join("cpu.max")).unwrap(), "50000 100000");
        assert_eq!(
            read(&v2.join("memory.max")).unwrap(),
            (64u64 << 20).to_string()
        );
    } else {
        panic!(
            "the container's limits are in neither {} (v1) nor {} (v2)",
            v1.display(),
            v2.display()
        );
    }
    let pid = c.pid.expect("pid");
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(own.contains(&cg), "pid {pid} is not in {cg}:\n{own}");
    // env, exec's exit code, and the shared PID namespace (the sandbox's pause is visible).
    let env = ok(&["exec", "shop/shaped", "stubborn", "--", "env"]);
    assert!(env.contains("GREETING=hello"), "{env}");
    let out = node(&[
        "exec",
        "shop/shaped",
        "side",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let ps = ok(&["exec", "shop/shaped", "side", "--", "ps"]);
    assert!(
        ps.contains("podscope-helper pause") && ps.contains("sigterm handle"),
        "{ps}"
    );
    // CRI's view: kubelet's labels on the sandbox.
    let sandbox = s.sandbox_id.clone().expect("sandbox");
    let labels = rt().block_on(async {
        let mut cri = Cri::connect(paths::SOCKET).await.expect("CRI");
        let sb = cri.list_sandboxes().await.expect("ListPodSandbox");
        sb.into_iter()
            .find(|x| x.id == sandbox)
            .expect("our sandbox")
            .labels
    });
    assert_eq!(labels["io.kubernetes.pod.name"], "shaped");
    assert_eq!(labels["io.kubernetes.pod.namespace"], "shop");
    assert_eq!(labels["io.kubernetes.pod.uid"], s.uid);
    // A handled SIGTERM ends the container with 0 well within the grace period.
    let d = pod_json(&["delete", "shop/shaped", "--wait", "-o", "json"]);
    assert_eq!(
        d.container("stubborn").and_then(|c| c.exit_code),
        Some(0),
        "{d:#?}"
    );
    // As kubelet's pod container manager, the deletion removed the pod's
    // cgroup in every hierarchy (the v2 tree and each v1 controller).
    let pod_rel = s.cgroup_parent.trim_start_matches('/');
    let left: Vec<String> = testnode::cleanup::hierarchies()
        .iter()
        .map(|h| h.join(pod_rel))
        .filter(|d| d.exists())
        .map(|d| d.display().to_string())
        .collect();
    assert!(
        left.is_empty(),
        "the deleted pod's cgroup is left in {left:?}"
    );
    let _ = std::fs::remove_file(f);
}

fn scenario_unsupported_field() {
    let f = variant(
        "ignores-sigterm.yaml",
        &[(
            "    command:",
            "    volumeMounts: [{name: data, mountPath: /data}]\n    command:",
        )],
    );
    let out = node(&["apply", "-f", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown field `volumeMounts`") && err.contains("spec.containers[0]"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    let _ = std::fs::remove_file(f);
}

/// No registry is reachable: any image runs the node's own, with a notice.
fn scenario_any_image_runs_with_a_notice() {
    let f = variant(
        "ignores-sigterm.yaml",
        &[
            ("name: ignores-sigterm\n", "name: other-image\n"),
            ("    command:", "    image: busybox:1.36\n    command:"),
        ],
    );
    let out = node(&["apply", "-f", f.to_str().unwrap(), "--wait", "running"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("notice:")).count(),
        1,
        "one notice line: {err}"
    );
    assert!(
        err.contains("busybox:1.36") && err.contains(paths::IMAGE),
        "{err}"
    );
    let s = status("examples/other-image");
    assert_eq!(s.containers[0].image, "busybox:1.36", "{s:#?}");
    ok(&[
        "delete",
        "examples/other-image",
        "--grace-period",
        "0",
        "--wait",
    ]);
    let _ = std::fs::remove_file(f);
}

/// A kubelet daemon replaced mid-delete (another `up` from a rebuilt binary
/// does that) still finishes the deletion.
fn scenario_delete_survives_kubelet_restart() {
    let f = variant(
        "ignores-sigterm.yaml",
        &[
            // The 3 s grace keeps the teardown in progress while the daemon is replaced.
            ("name: ignores-sigterm\n", "name: orphan\n"),
        ],
    );
    ok(&["apply", "-f", f.to_str().unwrap(), "--wait", "running"]);
    ok(&["delete", "examples/orphan"]);
    let pid = testnode::process::read_pid(&paths::kubelet_pid()).expect("kubelet pid");
    testnode::process::terminate(pid, Duration::from_secs(5)).expect("stop the kubelet daemon");
    let up = ok(&["up"]);
    assert!(up.contains("started the kubelet daemon"), "{up}");
    let s = pod_json(&[
        "delete",
        "examples/orphan",
        "--wait",
        "--timeout",
        "20s",
        "-o",
        "json",
    ]);
    assert_eq!(s.phase, Phase::Deleted, "{s:#?}");
    assert!(
        !paths::deleting_file("examples", "orphan").exists(),
        "marker left"
    );
    let _ = std::fs::remove_file(f);
}

fn scenario_containerd_restart() {
    let f = variant(
        "ignores-sigterm.yaml",
        &[
            ("name: ignores-sigterm\n", "name: survivor\n"),
            (
                "terminationGracePeriodSeconds: 3",
                "terminationGracePeriodSeconds: 0",
            ),
        ],
    );
    let s = pod_json(&[
        "apply",
        "-f",
        f.to_str().unwrap(),
        "--wait",
        "running",
        "-o",
        "json",
    ]);
    let pid = s.containers[0].pid.expect("pid") as i32;
    ok(&["containerd", "stop"]);
    assert!(!Path::new(paths::SOCKET).exists() || testnode::containerd::running().is_none());
    assert!(
        testnode::process::is_running(pid),
        "the container died with containerd"
    );
    ok(&["containerd", "start"]);
    let out = ok(&[
        "exec",
        "examples/survivor",
        "stubborn",
        "--",
        "echo",
        "back",
    ]);
    assert_eq!(out, "back\n");
    ok(&["delete", "examples/survivor", "--wait"]);
    let _ = std::fs::remove_file(f);
}

/// `down` after everything: nothing of ours is left.
fn check_down() {
    let pre: Option<cleanup::Preexisting> = std::fs::read(paths::preexisting())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let had_kubepods = pre.is_none_or(|p| !p.kubepods.is_empty());
    let containerd = testnode::containerd::running();
    let kubelet = testnode::process::read_pid(&paths::kubelet_pid());
    let out = ok(&["down"]);
    assert!(out.contains("the test node is down"), "{out}");
    assert!(!testnode::netns::path().exists(), "netns left");
    assert!(!Path::new(paths::LOCK_FILE).exists(), "lock file left");
    assert!(
        !Path::new(paths::STATE_DIR).exists() && !Path::new(paths::ROOT_DIR).exists(),
        "state dirs left"
    );
    for pid in containerd.into_iter().chain(kubelet) {
        assert!(
            !testnode::process::is_running(pid),
            "process {pid} left running"
        );
    }
    assert!(
        cleanup::shim_pids().is_empty(),
        "shims left: {:?}",
        cleanup::shim_pids()
    );
    assert!(
        cleanup::mounts_under(&[paths::STATE_DIR, paths::ROOT_DIR]).is_empty(),
        "mounts left"
    );
    if !had_kubepods {
        for h in cleanup::hierarchies() {
            assert!(
                !h.join(paths::KUBEPODS).exists(),
                "{} left",
                h.join(paths::KUBEPODS).display()
            );
        }
    }
    let again = ok(&["down"]);
    assert!(
        again.contains("the test node is down"),
        "down is not idempotent: {again}"
    );
}

#[test]
fn test_node_end_to_end() {
    if !root_or_skip("testnode end-to-end") {
        return;
    }
    // `down` is checked whatever the state before; a node that was up (the
    // xtask test run brings one up for the whole suite) is brought up again
    // afterwards, without the pods it had.
    let was_up = testnode::containerd::running().is_some();
    let scenarios: &[Scenario] = &[
        ("up is idempotent", scenario_up_is_idempotent),
        (
            "unsupported field is a clear error",
            scenario_unsupported_field,
        ),
        ("exit-nonzero restarts", scenario_exit_nonzero_restarts),
        ("oom is OOMKilled/137", scenario_oom_killed),
        (
            "ignores-sigterm takes the grace period",
            scenario_ignores_sigterm,
        ),
        ("background-dies keeps running", scenario_background_dies),
        ("pods look like kubelet's", scenario_kubelet_like_pod),
        (
            "delete survives a kubelet restart",
            scenario_delete_survives_kubelet_restart,
        ),
        (
            "any image runs the node's own, with a notice",
            scenario_any_image_runs_with_a_notice,
        ),
        (
            "containerd restarts under running pods",
            scenario_containerd_restart,
        ),
    ];
    let mut failed = run_scenarios("testnode", scenarios, None);
    let down = std::panic::catch_unwind(check_down);
    if down.is_err() {
        failed.push("down leaves nothing");
    }
    if was_up {
        say("testnode: the node was up before the tests: bringing it up again");
        ok(&["up"]);
    }
    assert!(failed.is_empty(), "failed scenarios: {failed:?}");
}
