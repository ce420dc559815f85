//! Why the runtime stopped a container, against real pods on the test node
//! (which plays kubelet: probes through CRI ExecSync, preStop before
//! StopContainer, deletion, eviction): `podscope why -o json`, asked of a
//! real agent, names the trigger with its evidence and the preStop
//! timeline. Needs root.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{agent::Agent, apply, node, privileged, required, testnode};

/// A namespace of its own per run: records of an earlier run's pods (the
/// agent's journal is fresh, but their teardown may still be reported) never
/// stand in for this run's.
fn ns() -> &'static str {
    static NS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NS.get_or_init(|| format!("podscope-trigger-{}", std::process::id()))
}

fn say(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Pods the test made, deleted even when it fails.
struct Cleanup {
    pods: Vec<String>,
    state: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ns = ns();
        if let Some(bin) = testnode() {
            for p in &self.pods {
                let _ = std::process::Command::new(&bin)
                    .args([
                        "delete",
                        &format!("{ns}/{p}"),
                        "--grace-period",
                        "0",
                        "--wait",
                    ])
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
        // Left by an agent the test killed on purpose.
        let _ = std::fs::remove_file(support::api_socket(&self.state));
    }
}

fn manifest(name: &str, grace: u32, container: &str) -> String {
    let ns = ns();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{testnode.podscope.dev/backoff-initial-seconds: \"1\"}}\nspec:\n  terminationGracePeriodSeconds: {grace}\n  containers:\n  - name: app\n{container}"
    )
}

/// `podscope why NS/POD` as a person reads it.
fn why_table(agent: &Agent, pod: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_podscope"))
        .args([
            "why",
            &format!("{}/{pod}", ns()),
            "--agent",
            agent.socket.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "why failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    say(&text);
    text
}

fn trigger(r: &Value) -> &str {
    r["trigger"]["trigger"].as_str().unwrap_or("none")
}

#[test]
fn runtime_stops_are_explained() {
    if !privileged("runtime_stops_are_explained") {
        return;
    }
    if testnode().is_none() {
        assert!(!required(), "podscope-testnode is not built");
        support::say_skipped(
            "runtime_stops_are_explained",
            "podscope-testnode is not built (cargo build --release -p testnode)",
        );
        return;
    }
    node(&["up"]);
    let ns = ns();
    let state = std::env::temp_dir().join(format!("podscope-trigger-state-{}", std::process::id()));
    let mut cleanup = Cleanup {
        pods: vec![],
        state: state.clone(),
    };
    let agent = Agent::start(ns, &state, &[]);

    say("an exec liveness probe that starts failing, with a preStop hook");
    cleanup.pods.push("liveness".into());
    apply(
        "liveness",
        "running",
        &manifest(
            "liveness",
            30,
            "    command: [sh, -c, \"touch /tmp/healthy; sleep 3; rm /tmp/healthy; exec podscope-helper sigterm handle\"]\n    livenessProbe:\n      exec: {command: [cat, /tmp/healthy]}\n      periodSeconds: 1\n      failureThreshold: 2\n      terminationGracePeriodSeconds: 5\n    lifecycle:\n      preStop: {exec: {command: [sh, -c, \"sleep 1\"]}}\n",
        ),
    );
    let r = agent.record("liveness", "app");
    assert_eq!(trigger(&r), "liveness_probe", "{r:#}");
    assert_eq!(r["trigger"]["basis"], "observed", "{r:#}");
    let failures = r["trigger"]["probe_failures"]
        .as_array()
        .expect("probe runs");
    assert!(!failures.is_empty(), "{r:#}");
    assert!(
        failures
            .iter()
            .all(|f| f["command"] == "cat" && f["exit_code"] == 1),
        "the failing probe runs are `cat` exiting 1: {r:#}"
    );
    let hook = &r["pre_stop"];
    assert_eq!(
        hook["ran"], true,
        "preStop runs on a liveness kill too: {r:#}"
    );
    assert!(
        hook["command"] == "sh" || hook["command"] == "sleep",
        "{r:#}"
    );
    assert!(hook["duration_seconds"].as_f64().unwrap() >= 0.9, "{r:#}");
    assert!(
        hook["gap_to_sigterm_seconds"].as_f64().unwrap() >= 0.0,
        "hook before SIGTERM: {r:#}"
    );
    assert_eq!(r["reason"], "GracefulStop", "{r:#}");
    let restarts = agent.metrics();
    assert!(
        restarts
            .lines()
            .any(|l| l.starts_with("podscope_container_restarts_total{")
                && l.contains("pod=\"liveness\"")
                && l.contains("trigger=\"liveness_probe\"")),
        "{restarts}"
    );

    say("deletion with a preStop hook, one longer than the grace period, and none");
    let hooked = |hook: &str| {
        format!(
            "    command: [podscope-helper, sigterm, handle]\n    lifecycle:\n      preStop: {{exec: {{command: {hook}}}}}\n"
        )
    };
    for (name, grace, container) in [
        ("deleted-hook", 10, hooked("[sh, -c, \"sleep 1\"]")),
        ("deleted-long-hook", 2, hooked("[sleep, \"30\"]")),
        (
            "deleted",
            10,
            "    command: [podscope-helper, sigterm, handle]\n".to_string(),
        ),
    ] {
        cleanup.pods.push(name.into());
        apply(name, "running", &manifest(name, grace, &container));
        node(&["delete", &format!("{ns}/{name}"), "--wait"]);
    }
    let r = agent.record("deleted-hook", "app");
    assert_eq!(trigger(&r), "pod_deleted", "{r:#}");
    assert_eq!(r["trigger"]["decided"], true);
    let hook = &r["pre_stop"];
    assert_eq!(
        (hook["ran"].as_bool(), hook["cut_short_by_grace"].as_bool()),
        (Some(true), Some(false)),
        "{r:#}"
    );
    assert!(hook["duration_seconds"].as_f64().unwrap() >= 0.9, "{r:#}");
    assert_eq!(hook["exit_code"], 0);

    let r = agent.record("deleted-long-hook", "app");
    assert_eq!(trigger(&r), "pod_deleted", "{r:#}");
    assert_eq!(r["pre_stop"]["ran"], true, "{r:#}");
    assert_eq!(r["pre_stop"]["cut_short_by_grace"], true, "{r:#}");

    let r = agent.record("deleted", "app");
    assert_eq!(trigger(&r), "pod_deleted", "{r:#}");
    assert!(r["pre_stop"].is_null(), "no hook, no timeline: {r:#}");

    say("eviction: the grace override");
    cleanup.pods.push("evicted".into());
    apply(
        "evicted",
        "running",
        &manifest(
            "evicted",
            30,
            "    command: [podscope-helper, sigterm, ignore]\n",
        ),
    );
    node(&["evict", &format!("{ns}/evicted"), "--wait"]);
    let r = agent.record("evicted", "app");
    assert_eq!(trigger(&r), "evicted", "{r:#}");
    assert_eq!(r["trigger"]["basis"], "inferred");
    assert_eq!(r["reason"], "KilledAfterGracePeriod", "{r:#}");
    assert!(
        r["stop"]["grace_used_seconds"].as_f64().unwrap() < 10.0,
        "{r:#}"
    );

    say("a container that ends on its own has no trigger");
    cleanup.pods.push("exits".into());
    apply(
        "exits",
        "exited",
        &manifest("exits", 1, "    command: [sh, -c, \"exit 3\"]\n")
            .replace("  containers:", "  restartPolicy: Never\n  containers:"),
    );
    let r = agent.record("exits", "app");
    assert!(r["trigger"].is_null(), "{r:#}");

    // The table view puts the trigger first.
    let text = why_table(&agent, "liveness");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines
            .get(1)
            .is_some_and(|l| l.contains("trigger: liveness_probe")),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(10));
    agent.stop();
}

/// The node's network probes, init containers and a supervisor inside a
/// container, through the real agent (watching the node's network
/// namespace, where the test node's prober connects from) and `why -o json`.
#[test]
fn network_probes_init_containers_and_respawns_are_explained() {
    let test = "network_probes_init_containers_and_respawns_are_explained";
    if !privileged(test) {
        return;
    }
    if testnode().is_none() {
        assert!(!required(), "podscope-testnode is not built");
        support::say_skipped(
            test,
            "podscope-testnode is not built (cargo build --release -p testnode)",
        );
        return;
    }
    node(&["up"]);
    let ns = ns();
    let state =
        std::env::temp_dir().join(format!("podscope-trigger-net-state-{}", std::process::id()));
    let mut cleanup = Cleanup {
        pods: vec![],
        state: state.clone(),
    };
    let agent = Agent::start(
        ns,
        &state,
        &[("PODSCOPE_NETNS", "/run/netns/podscope-node")],
    );

    say("an httpGet liveness probe against a server that stops answering");
    cleanup.pods.push("http-liveness".into());
    apply(
        "http-liveness",
        "running",
        &manifest(
            "http-liveness",
            2,
            "    command: [sh, -c, \"mkdir -p /www && echo ok > /www/healthz && (httpd -f -p 8080 -h /www & sleep 4; kill $!) & exec sleep 3600\"]\n    ports: [{containerPort: 8080}]\n    livenessProbe:\n      httpGet: {path: /healthz, port: 8080}\n      periodSeconds: 1\n      failureThreshold: 2\n",
        ),
    );
    let r = agent.record("http-liveness", "app");
    assert_eq!(trigger(&r), "liveness_probe", "{r:#}");
    assert_eq!(r["trigger"]["basis"], "observed", "{r:#}");
    let conns = r["trigger"]["probe_connections"]
        .as_array()
        .expect("the probe's connections");
    let last = conns.last().expect("a connection");
    assert_eq!(last["outcome"], "refused", "{r:#}");
    assert_eq!(last["reason"], "NO_SOCKET", "{r:#}");
    assert!(
        last["dst"].as_str().is_some_and(|d| d.ends_with(":8080")),
        "{r:#}"
    );
    assert!(
        conns.iter().any(|c| c["outcome"] == "not_refused"),
        "the probe's connections were taken before the server stopped: {r:#}"
    );
    let evidence = r["trigger"]["evidence"].as_str().unwrap();
    assert!(evidence.contains("refused"), "{evidence}");
    why_table(&agent, "http-liveness");

    say("an init container that exits 1");
    cleanup.pods.push("init-fails".into());
    apply(
        "init-fails",
        "none",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: init-fails\n  namespace: {ns}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  initContainers:\n  - name: setup\n    command: [sh, -c, \"exit 1\"]\n  containers:\n  - name: app\n    command: [sleep, \"3600\"]\n"
        ),
    );
    let r = agent.record("init-fails", "setup");
    assert_eq!(r["container_type"]["type"], "init", "{r:#}");
    assert_eq!(r["container_type"]["basis"], "observed", "{r:#}");
    assert_eq!(r["exit_code"], 1, "{r:#}");
    assert_eq!(r["reason"], "Error", "{r:#}");
    let explanation = r["explanation"].as_str().unwrap();
    assert!(
        explanation.starts_with("init container setup:")
            && explanation.contains("app containers never started"),
        "{explanation}"
    );
    let all = agent.why("init-fails");
    assert!(
        all["terminations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["container"] != "app"),
        "the app container never ran: {all:#}"
    );
    support::wait_until("Init:Error in the node's status", 30, || {
        node(&["status", &format!("{ns}/init-fails")]).contains("Init:Error")
    });
    let table = why_table(&agent, "init-fails");
    assert!(
        table.contains("container setup (init container): Error"),
        "{table}"
    );

    say("a supervisor loop respawning a worker that fails");
    cleanup.pods.push("supervisor".into());
    apply(
        "supervisor",
        "running",
        &manifest(
            "supervisor",
            1,
            "    command: [sh, -c, \"printf '#!/bin/sh\\\\nsleep 0.3\\\\nexit 1\\\\n' > /tmp/worker && chmod +x /tmp/worker && while true; do /tmp/worker; done\"]\n",
        ),
    );
    let want = 5;
    let mut seen = Value::Null;
    support::wait_until("the worker's respawns counted", 60, || {
        let all = agent.why("supervisor");
        seen = all.clone();
        all["respawns"].as_array().is_some_and(|rs| {
            rs.iter().any(|x| {
                x["container"] == "app"
                    && x["command"] == "worker"
                    && x["respawns"].as_u64().is_some_and(|n| n >= want)
            })
        })
    });
    let x = seen["respawns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["command"] == "worker")
        .unwrap()
        .clone();
    assert_eq!(x["main_alive"], true, "{x:#}");
    assert_eq!(x["parent_is_main"], true, "{x:#}");
    assert_eq!(x["last_exit_code"], 1, "{x:#}");
    assert!(x["failed_exits"].as_u64().unwrap() >= want, "{x:#}");
    let metrics = agent.metrics();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("podscope_container_respawns_total{")
                && l.contains("pod=\"supervisor\"")
                && l.contains("command=\"worker\"")),
        "{metrics}"
    );
    let table = why_table(&agent, "supervisor");
    assert!(
        table.contains("worker restarted") && table.contains("PID 1 alive"),
        "{table}"
    );
    // PID 1 still runs: no termination record for it.
    assert!(
        seen["terminations"].as_array().unwrap().is_empty(),
        "{seen:#}"
    );
    agent.stop();
}
