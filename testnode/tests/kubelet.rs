//! The node's kubelet behaviour on a real node (needs root): probes,
//! lifecycle hooks, init containers, restart back-off, grace overrides and
//! eviction, multi-document manifests. kubelet is the reference
//! (pkg/kubelet/prober, pkg/kubelet/kuberuntime killContainer).
//!
//! Brings the node up if it is not (and leaves it up: other tests share
//! it); every pod lives in the namespace `kubelet-tests` and is deleted at
//! the end of its scenario. Without root: a visible SKIPPED line.

use std::time::{Duration, Instant, SystemTime};

use testnode::status::{Phase, PodStatus};

mod support;
use support::*;

const NS: &str = "kubelet-tests";
/// Shortens kubelet's 10 s initial back-off for tests (order stays kubelet's).
const FAST_BACKOFF: &str = "testnode.podscope.dev/backoff-initial-seconds: \"1\"";

fn write_manifest(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!(
        "podscope-kubelet-{}-{name}.yaml",
        std::process::id()
    ));
    std::fs::write(&p, text).expect("write manifest");
    p
}

fn apply(name: &str, text: &str, wait: &str) -> PodStatus {
    let p = write_manifest(name, text);
    let out = ok(&["apply", "-f", p.to_str().unwrap(), "--wait", wait]);
    let _ = std::fs::remove_file(p);
    say(out.lines().next().unwrap_or_default());
    // The status file appears once the daemon has picked the manifest up.
    wait_until(
        &format!("{NS}/{name}"),
        Duration::from_secs(20),
        "a status",
        |_| true,
    )
}

fn time(s: &Option<String>) -> SystemTime {
    humantime::parse_rfc3339(s.as_deref().expect("a timestamp")).expect("RFC 3339")
}

fn delete(pod: &str, extra: &[&str]) -> (PodStatus, Duration) {
    let t = Instant::now();
    let mut args = vec!["delete", pod, "--wait", "-o", "json"];
    args.extend_from_slice(extra);
    (pod_json(&args), t.elapsed())
}

/// An exec liveness probe that starts failing: the container is killed
/// (preStop first, with the probe's grace period) and restarts in the same
/// sandbox; the kill names the failing probe.
fn scenario_exec_liveness() {
    let s = apply(
        "live-exec",
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: live-exec, namespace: {NS}, annotations: {{{FAST_BACKOFF}}}}}
spec:
  terminationGracePeriodSeconds: 30
  containers:
  - name: app
    command: [sh, -c, "touch /tmp/healthy; sleep 2; rm /tmp/healthy; exec sleep 3600"]
    livenessProbe:
      exec: {{command: [cat, /tmp/healthy]}}
      periodSeconds: 1
      failureThreshold: 2
      terminationGracePeriodSeconds: 3
    lifecycle:
      preStop: {{exec: {{command: [sh, -c, "sleep 1"]}}}}
"#
        ),
        "running",
    );
    let sandbox = s.sandbox_id.clone();
    let t = Instant::now();
    let s = wait_until(
        &format!("{NS}/live-exec"),
        Duration::from_secs(40),
        "a restart after the liveness probe failed",
        |s| s.containers[0].restart_count >= 1 && s.containers[0].state == "running",
    );
    // The probe's 3 s grace, not the pod's 30 s, bounded the kill.
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    let c = &s.containers[0];
    let last = c.last_termination.as_ref().expect("last termination");
    let why = last.kill_reason.as_deref().unwrap_or_default();
    assert!(
        why.starts_with("liveness probe failed") && why.contains("cat"),
        "{s:#?}"
    );
    assert_eq!(s.sandbox_id, sandbox, "restarted in the same sandbox");
    let hook = c
        .pre_stop
        .as_ref()
        .expect("preStop ran on the liveness kill");
    assert_eq!(hook.outcome, "succeeded", "{hook:?}");
    assert!(hook.duration_ms >= 900, "{hook:?}");
    // SIGTERM is discarded by a PID 1 without a handler: SIGKILL after the grace.
    assert!([137, 143].contains(&last.exit_code), "{s:#?}");
    delete(&format!("{NS}/live-exec"), &["--grace-period", "0"]);
}

/// httpGet readiness, liveness and a tcpSocket startup probe against
/// busybox httpd; readiness drives the Service's endpoints in kube-proxy's
/// rules. The manifest is one file with a Service and a Pod.
fn scenario_http_probes_and_endpoints() {
    let text = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: probed, namespace: {NS}}}
spec:
  selector: {{app: probed-web}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: {NS}
  labels: {{app: probed-web}}
  annotations: {{{FAST_BACKOFF}}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: httpd
    command: [sh, -c, "mkdir -p /www && echo ok > /www/healthz && echo ok > /www/ready && exec httpd -f -p 8080 -h /www"]
    ports: [{{containerPort: 8080, name: http}}]
    startupProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1, failureThreshold: 20}}
    readinessProbe: {{httpGet: {{path: /ready, port: http}}, periodSeconds: 1}}
    livenessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1, failureThreshold: 2}}
"#
    );
    apply("web", &text, "running");
    let pod = format!("{NS}/web");
    let s = wait_until(&pod, Duration::from_secs(20), "ready", |s| {
        s.containers[0].ready
    });
    let endpoint = format!("{}:8080", s.pod_ip.clone().expect("pod IP"));
    let rules = || std::fs::read_to_string(testnode::paths::kube_proxy_rules()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rules().contains(&endpoint) {
        assert!(
            Instant::now() < deadline,
            "no endpoint {endpoint}:\n{}",
            rules()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Not ready: out of the endpoints, still running.
    ok(&["exec", &pod, "httpd", "--", "rm", "/www/ready"]);
    wait_until(&pod, Duration::from_secs(20), "not ready", |s| {
        !s.containers[0].ready
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while rules().contains(&endpoint) {
        assert!(Instant::now() < deadline, "endpoint {endpoint} stayed");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(&pod).containers[0].restart_count, 0);
    // Liveness: a 404 kills and restarts it.
    ok(&["exec", &pod, "httpd", "--", "rm", "/www/healthz"]);
    let s = wait_until(&pod, Duration::from_secs(30), "a liveness restart", |s| {
        s.containers[0].restart_count >= 1
    });
    let why = s.containers[0]
        .last_termination
        .as_ref()
        .and_then(|t| t.kill_reason.clone());
    assert!(
        why.as_deref()
            .is_some_and(|w| w.starts_with("liveness probe failed") && w.contains("404")),
        "{s:#?}"
    );
    wait_until(&pod, Duration::from_secs(20), "ready again", |s| {
        s.containers[0].ready
    });
    delete(&pod, &["--grace-period", "0"]);
    ok(&["delete", &format!("service/{NS}/probed")]);
}

fn hooked(name: &str, grace: u32, pre_stop: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NS}}}
spec:
  terminationGracePeriodSeconds: {grace}
  containers:
  - name: app
    command: [podscope-helper, sigterm, handle]
    lifecycle:
      postStart: {{exec: {{command: [touch, /tmp/started]}}}}
      preStop: {pre_stop}
"#
    )
}

/// preStop on deletion runs before SIGTERM; one longer than the grace
/// period is cut short; `--grace-period 0` skips it (2 s minimum); an
/// eviction uses the grace override and says Evicted.
fn scenario_hooks_and_deletion() {
    let s = apply(
        "pre-stop",
        &hooked("pre-stop", 10, "{exec: {command: [sh, -c, \"sleep 1\"]}}"),
        "running",
    );
    assert_eq!(
        s.containers[0]
            .post_start
            .as_ref()
            .map(|h| h.outcome.as_str()),
        Some("succeeded")
    );
    let (s, took) = delete(&format!("{NS}/pre-stop"), &[]);
    let c = &s.containers[0];
    let hook = c.pre_stop.as_ref().expect("preStop ran");
    assert_eq!(
        (hook.action.as_str(), hook.outcome.as_str()),
        ("exec", "succeeded")
    );
    assert!(
        hook.duration_ms >= 900 && took < Duration::from_secs(8),
        "{hook:?} {took:?}"
    );
    assert_eq!(c.kill_reason.as_deref(), Some("pod deleted"));
    // The helper exits 0 on SIGTERM: SIGTERM came after the hook, not SIGKILL.
    assert_eq!(c.exit_code, Some(0), "{s:#?}");
    assert!(time(&c.finished_at) >= time(&Some(hook.started_at.clone())));

    apply(
        "long-hook",
        &hooked("long-hook", 2, "{sleep: {seconds: 30}}"),
        "running",
    );
    let (s, took) = delete(&format!("{NS}/long-hook"), &[]);
    let hook = s.containers[0].pre_stop.clone().expect("preStop ran");
    assert!(
        hook.outcome.starts_with("cut short by the grace period"),
        "{hook:?}"
    );
    assert!(
        hook.duration_ms < 5000 && took < Duration::from_secs(15),
        "{hook:?} {took:?}"
    );

    apply(
        "no-hook",
        &hooked("no-hook", 30, "{sleep: {seconds: 30}}"),
        "running",
    );
    let (s, took) = delete(&format!("{NS}/no-hook"), &["--grace-period", "0"]);
    assert_eq!(
        s.containers[0].pre_stop, None,
        "grace 0 skips preStop: {s:#?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");

    apply(
        "evicted",
        &hooked("evicted", 30, "{sleep: {seconds: 30}}"),
        "running",
    );
    let t = Instant::now();
    let out = ok(&["evict", &format!("{NS}/evicted"), "--wait"]);
    assert!(out.contains("evicted"), "{out}");
    let s = status(&format!("{NS}/evicted"));
    assert_eq!(s.reason.as_deref(), Some("Evicted"), "{s:#?}");
    assert_eq!(s.containers[0].kill_reason.as_deref(), Some("evicted"));
    assert_eq!(s.containers[0].pre_stop, None, "hard eviction: no preStop");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

fn with_init(name: &str, policy: &str, init: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NS}, annotations: {{{FAST_BACKOFF}}}}}
spec:
  restartPolicy: {policy}
  terminationGracePeriodSeconds: 1
  initContainers:
  - name: first
    command: [sh, -c, "sleep 1"]
  - name: second
    command: [sh, -c, "{init}"]
{extra}  containers:
  - name: app
    command: [sleep, "3600"]
"#
    )
}

/// Init containers in order, each to completion before the app; a failing
/// one fails the pod (Never: Init:Error) or crash-loops (Init:CrashLoopBackOff).
fn scenario_init_containers() {
    let s = apply(
        "init-ok",
        &with_init("init-ok", "Always", "exit 0", ""),
        "running",
    );
    let (a, b, app) = (
        &s.init_containers[0],
        &s.init_containers[1],
        &s.containers[0],
    );
    assert_eq!((a.exit_code, b.exit_code), (Some(0), Some(0)), "{s:#?}");
    assert!(time(&a.finished_at) <= time(&b.started_at), "{s:#?}");
    assert!(time(&b.finished_at) <= time(&app.started_at), "{s:#?}");
    delete(&format!("{NS}/init-ok"), &[]);

    apply(
        "init-fails",
        &with_init("init-fails", "Never", "exit 1", ""),
        "none",
    );
    let pod = format!("{NS}/init-fails");
    let s = wait_until(&pod, Duration::from_secs(20), "Failed", |s| {
        s.phase == Phase::Failed
    });
    assert_eq!(s.reason.as_deref(), Some("Init:Error"), "{s:#?}");
    assert_eq!(s.init_containers[1].exit_code, Some(1));
    assert_eq!(s.containers[0].container_id, None, "the app never started");
    let table = ok(&["status", &pod]);
    assert!(table.contains("Init:Error"), "{table}");
    delete(&pod, &[]);

    apply(
        "init-loops",
        &with_init("init-loops", "OnFailure", "exit 1", ""),
        "none",
    );
    let pod = format!("{NS}/init-loops");
    let s = wait_until(
        &pod,
        Duration::from_secs(30),
        "Init:CrashLoopBackOff",
        |s| s.reason.as_deref() == Some("Init:CrashLoopBackOff"),
    );
    assert!(s.init_containers[1].restart_count >= 1, "{s:#?}");
    assert_eq!(s.phase, Phase::Pending);
    assert_eq!(s.containers[0].container_id, None);
    delete(&pod, &[]);
}

/// kubelet's back-off: the first restart at once, then each wait longer
/// than the one before, shown as CrashLoopBackOff (order, not timings).
fn scenario_crash_loop_back_off() {
    let text = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: crash-loop, namespace: {NS}, annotations: {{{FAST_BACKOFF}}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    command: [sh, -c, "exit 1"]
"#
    );
    apply("crash-loop", &text, "none");
    let pod = format!("{NS}/crash-loop");
    // restart n → how long the container waited after attempt n-1 finished.
    let mut waits: Vec<Option<Duration>> = vec![None; 5];
    let mut saw_back_off = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while waits[1..].iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "restarts seen: {waits:?}");
        let out = node(&["status", &pod, "-o", "json"]);
        if let Ok(s) = serde_json::from_slice::<PodStatus>(&out.stdout) {
            let c = &s.containers[0];
            saw_back_off |= c.waiting_reason.as_deref() == Some("CrashLoopBackOff");
            let n = c.restart_count as usize;
            if (1..waits.len()).contains(&n)
                && waits[n].is_none()
                && let (Some(last), Some(_)) = (&c.last_termination, &c.started_at)
            {
                waits[n] = time(&c.started_at)
                    .duration_since(time(&last.finished_at))
                    .ok();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let waits: Vec<Duration> = waits.into_iter().flatten().collect();
    say(&format!("crash-loop waits: {waits:?}"));
    assert!(
        waits.windows(2).all(|w| w[0] < w[1]),
        "each restart waits longer than the one before: {waits:?}"
    );
    assert!(saw_back_off, "CrashLoopBackOff was shown while waiting");
    let table = ok(&["status", &pod]);
    say(&table);
    delete(&pod, &[]);
}

/// What the node refuses, in one clear sentence each.
fn scenario_refusals() {
    let p = write_manifest(
        "deploy",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {}\n",
    );
    let out = node(&["apply", "-f", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("kind `Deployment`") && err.trim().lines().count() == 1,
        "{err}"
    );
    let _ = std::fs::remove_file(p);
}

#[test]
fn kubelet_behaviour() {
    if !root_or_skip("testnode kubelet behaviour") {
        return;
    }
    ok(&["up"]);
    let scenarios: &[Scenario] = &[
        ("refusals", scenario_refusals),
        (
            "exec liveness restarts in the sandbox",
            scenario_exec_liveness,
        ),
        (
            "http probes drive endpoints",
            scenario_http_probes_and_endpoints,
        ),
        (
            "hooks, grace overrides, eviction",
            scenario_hooks_and_deletion,
        ),
        ("init containers", scenario_init_containers),
        ("crash-loop back-off", scenario_crash_loop_back_off),
    ];
    let only = std::env::var("KUBELET_SCENARIO").ok();
    let failed = run_scenarios("kubelet", scenarios, only.as_deref());
    // Whatever failed, leave no pod of ours behind.
    for s in testnode::status::read_all().unwrap_or_default() {
        if s.namespace == NS && s.phase != Phase::Deleted {
            let _ = node(&[
                "delete",
                &format!("{NS}/{}", s.name),
                "--grace-period",
                "0",
                "--wait",
            ]);
        }
    }
    let _ = node(&["delete", &format!("service/{NS}/probed")]);
    assert!(failed.is_empty(), "failed scenarios: {failed:?}");
}
