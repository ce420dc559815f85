//! Termination forensics against real pods on the test node: for each way a
//! container can end, `podscope why` (asking a real `podscope agent`) gives
//! the right reason, exit code, signal and sender, the metrics agree, the
//! records survive an agent restart, and an agent killed in the middle of
//! a journal write loses only that record. Needs root.

mod support;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{agent::Agent, apply, node, privileged, required, testnode, wait_until};

const NS: &str = "podscope-why";

/// Pods and cgroup limits the test made, removed even when it fails.
struct Cleanup {
    pods: Vec<String>,
    state: PathBuf,
    limit_file: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(f) = &self.limit_file {
            let unlimited = if f.ends_with("memory.max") {
                "max"
            } else {
                "-1"
            };
            let _ = std::fs::write(f, unlimited);
        }
        if let Some(bin) = testnode() {
            for p in &self.pods {
                let _ = Command::new(&bin)
                    .args(["delete", &format!("{NS}/{p}"), "--wait"])
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
        // Left by an agent the test killed on purpose.
        let _ = std::fs::remove_file(support::api_socket(&self.state));
    }
}

/// A pod manifest; each container is (name, the YAML of its command and more).
fn pod(name: &str, spec: &str, containers: &[(&str, &str)]) -> String {
    let mut m = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  restartPolicy: Never\n{spec}  containers:\n"
    );
    for (c, body) in containers {
        m.push_str(&format!("  - name: {c}\n"));
        for line in body.lines() {
            m.push_str(&format!("    {line}\n"));
        }
    }
    m
}

const LIMIT_32MI: &str = "resources:\n  limits:\n    memory: 32Mi\n    cpu: 500m";

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{' | b' '))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn assert_record(r: &Value, reason: &str, code: i64, signal: Option<&str>, sender: Option<&str>) {
    assert_eq!(r["reason"], reason, "{r:#}");
    assert_eq!(r["exit_code"], code, "{r:#}");
    assert_eq!(r["signal"].as_str(), signal, "{r:#}");
    assert_eq!(r["sender"]["kind"].as_str(), sender, "{r:#}");
    assert!(
        !r["explanation"].as_str().unwrap_or("").is_empty(),
        "an explanation: {r:#}"
    );
}

/// The runtime's report of the end (what kubectl shows) and whether the
/// record calls it a contradiction of the kernel's view.
fn assert_runtime(r: &Value, reason: &str, code: i64, contradicts: bool) {
    let k = &r["runtime_reported"];
    assert_eq!(
        (k["reason"].as_str(), k["exit_code"].as_i64()),
        (Some(reason), Some(code)),
        "{r:#}"
    );
    assert_eq!(k["note"].is_string(), contradicts, "{r:#}");
}

fn say(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "terminations: {msg}");
}

/// The memory cgroup above the pods of one QoS class, v1 or v2.
/// The pid of a pod's first container (the test node's status JSON).
fn main_pid(status: &Value) -> i64 {
    status["containers"][0]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("no pid in {status}"))
}

fn besteffort_limit_file() -> Option<PathBuf> {
    [
        "/sys/fs/cgroup/memory/kubepods/besteffort/memory.limit_in_bytes",
        "/sys/fs/cgroup/kubepods/besteffort/memory.max",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

#[test]
fn terminations_are_explained() {
    if !privileged("terminations_are_explained") {
        return;
    }
    if testnode().is_none() {
        assert!(!required(), "podscope-testnode is not built");
        support::say_skipped(
            "terminations_are_explained",
            "podscope-testnode is not built (cargo build --release -p testnode)",
        );
        return;
    }
    node(&["up"]);
    let state = std::env::temp_dir().join(format!("podscope-why-state-{}", std::process::id()));
    let mut cleanup = Cleanup {
        pods: vec![],
        state: state.clone(),
        limit_file: None,
    };
    let agent = Agent::start(NS, &state, &[]);
    let mut expect: Vec<(&str, &str, &str)> = vec![];

    say("exit 0 and exit 3");
    for (name, code) in [("done", 0), ("fails", 3)] {
        cleanup.pods.push(name.into());
        apply(
            name,
            "exited",
            &pod(
                name,
                "",
                &[(
                    "main",
                    &format!("command: [\"sh\", \"-c\", \"sleep 0.3; exit {code}\"]"),
                )],
            ),
        );
    }
    let r = agent.record("done", "main");
    assert_record(&r, "Completed", 0, None, None);
    assert_eq!(r["comm"], "sh");
    assert_record(&agent.record("fails", "main"), "Error", 3, None, None);
    // What kubectl shows, as the runtime reported it, beside the kernel's view.
    assert_runtime(&r, "Completed", 0, false);
    assert_runtime(&agent.record("fails", "main"), "Error", 3, false);
    expect.extend([("done", "main", "Completed"), ("fails", "main", "Error")]);

    say("a stop of a PID 1 that handles SIGTERM");
    cleanup.pods.push("graceful".into());
    let status = apply(
        "graceful",
        "running",
        &pod(
            "graceful",
            "  terminationGracePeriodSeconds: 10\n",
            &[(
                "app",
                "command: [\"podscope-helper\", \"sigterm\", \"handle\"]",
            )],
        ),
    );
    wait_until("the main process handles SIGTERM", 30, || {
        support::sigterm_disposition_set(main_pid(&status), true)
    });
    node(&["delete", &format!("{NS}/graceful"), "--wait"]);
    let r = agent.record("graceful", "app");
    assert_record(&r, "GracefulStop", 0, None, Some("runtime"));
    assert_eq!(r["stop"]["sigterm_handled"], true, "{r:#}");
    expect.push(("graceful", "app", "GracefulStop"));

    say("a stop with a 2 s grace of a PID 1 that ignores SIGTERM");
    cleanup.pods.push("stubborn".into());
    let status = apply(
        "stubborn",
        "running",
        &pod(
            "stubborn",
            "  terminationGracePeriodSeconds: 2\n",
            &[(
                "app",
                "command: [\"podscope-helper\", \"sigterm\", \"ignore\"]",
            )],
        ),
    );
    wait_until("the main process ignores SIGTERM", 30, || {
        support::sigterm_disposition_set(main_pid(&status), false)
    });
    node(&["delete", &format!("{NS}/stubborn"), "--wait"]);
    let r = agent.record("stubborn", "app");
    assert_record(
        &r,
        "KilledAfterGracePeriod",
        137,
        Some("SIGKILL"),
        Some("runtime"),
    );
    assert_eq!(r["stop"]["sigterm_sender"], "runtime", "{r:#}");
    assert_eq!(r["stop"]["sigterm_handled"], false, "{r:#}");
    // SIGTERM first, SIGKILL from the runtime once the 2 s grace ran out:
    // never before it (less 0.1 s: the runtime's timer starts just before
    // its SIGTERM); 30 s is an outer limit only a hang would reach.
    assert_eq!(r["stop"]["sigkill_sender"], "runtime", "{r:#}");
    let at = |k: &str| {
        humantime::parse_rfc3339(
            r["stop"][k]
                .as_str()
                .unwrap_or_else(|| panic!("no {k}: {r:#}")),
        )
        .unwrap()
    };
    assert!(
        at("sigterm_at") < at("sigkill_at"),
        "SIGTERM before SIGKILL: {r:#}"
    );
    let grace = r["stop"]["grace_used_seconds"].as_f64().unwrap();
    assert!(
        (1.9..30.0).contains(&grace),
        "SIGKILL after the 2 s grace, got {grace}: {r:#}"
    );
    expect.push(("stubborn", "app", "KilledAfterGracePeriod"));

    say("a container over its memory limit");
    cleanup.pods.push("hog".into());
    apply(
        "hog",
        "exited",
        &pod(
            "hog",
            "",
            &[(
                "app",
                &format!(
                    "command: [\"podscope-helper\", \"alloc\", \"64\", \"--hold\", \"60\"]\n{LIMIT_32MI}"
                ),
            )],
        ),
    );
    let r = agent.record("hog", "app");
    assert_record(&r, "OOMKilled", 137, Some("SIGKILL"), Some("oom_killer"));
    assert_eq!(r["oom"]["scope"], "container", "{r:#}");
    let (usage, limit) = (
        r["oom"]["usage_bytes"].as_f64().unwrap(),
        r["oom"]["limit_bytes"].as_f64().unwrap(),
    );
    assert_eq!(limit, 32.0 * 1048576.0, "{r:#}");
    assert!(
        usage >= 0.95 * limit && usage <= limit,
        "usage ≈ limit: {r:#}"
    );
    // containerd watches the cgroup for OOM kills only once the process
    // runs: a kill in the first instant is Error/137 to kubectl, and the
    // record says so. Which one this run got is the race's, not ours.
    match r["runtime_reported"]["reason"].as_str() {
        Some("OOMKilled") => assert_runtime(&r, "OOMKilled", 137, false),
        _ => assert_runtime(&r, "Error", 137, true),
    }
    expect.push(("hog", "app", "OOMKilled"));

    say("kubectl says OOMKilled, but PID 1 exited on its own after a worker's OOM kill");
    cleanup.pods.push("oom-then-exit".into());
    apply(
        "oom-then-exit",
        "exited",
        &pod(
            "oom-then-exit",
            "",
            &[(
                "app",
                &format!(
                    "command: [\"sh\", \"-c\", \"sleep 1; podscope-helper alloc 64 --hold 60; exit 1\"]\n{LIMIT_32MI}"
                ),
            )],
        ),
    );
    let r = agent.record("oom-then-exit", "app");
    assert_record(&r, "Error", 1, None, None);
    assert_eq!(r["previous_deaths"][0]["cause"], "oom_killed", "{r:#}");
    assert_runtime(&r, "OOMKilled", 1, true);
    let note = r["runtime_reported"]["note"].as_str().unwrap_or("");
    assert!(
        note.contains("the OOM killer ended podscope-helper"),
        "the note names the process the OOM killer ended: {r:#}"
    );
    let table = agent.why_table("oom-then-exit");
    assert!(
        table.contains(note) && table.contains("kubernetes: OOMKilled, exit code 1"),
        "why shows what kubectl shows and why it misleads:\n{table}"
    );
    expect.push(("oom-then-exit", "app", "Error"));

    say("a worker OOM-killed while PID 1 survives");
    cleanup.pods.push("worker-oom".into());
    apply(
        "worker-oom",
        "running",
        &pod(
            "worker-oom",
            "",
            &[(
                "app",
                &format!(
                    "command: [\"sh\", \"-c\", \"podscope-helper alloc 64 --hold 60; sleep 600\"]\n{LIMIT_32MI}"
                ),
            )],
        ),
    );
    let d = agent.death("worker-oom", "app", "oom_killed");
    assert_eq!(d["comm"], "podscope-helper", "{d:#}");
    assert_eq!(d["signal"], "SIGKILL", "{d:#}");

    say("a background process killed while PID 1 lives");
    cleanup.pods.push("bg-killed".into());
    apply(
        "bg-killed",
        "running",
        &pod(
            "bg-killed",
            "",
            &[(
                "app",
                "command: [\"sh\", \"-c\", \"sleep 300 & sleep 1; kill -9 $!; sleep 600\"]",
            )],
        ),
    );
    let d = agent.death("bg-killed", "app", "killed");
    assert_eq!(d["comm"], "sleep", "{d:#}");
    assert_eq!(d["sender"]["kind"], "same_container", "{d:#}");

    say("another container of a shareProcessNamespace pod kills the app");
    cleanup.pods.push("shared".into());
    apply(
        "shared",
        "none",
        &pod(
            "shared",
            "  shareProcessNamespace: true\n",
            &[
                (
                    "app",
                    "command: [\"podscope-helper\", \"sigterm\", \"ignore\"]",
                ),
                (
                    "killer",
                    "command: [\"sh\", \"-c\", \"until pidof podscope-helper; do sleep 0.2; done; sleep 1; kill -KILL $(pidof podscope-helper); sleep 600\"]",
                ),
            ],
        ),
    );
    let r = agent.record("shared", "app");
    assert_record(
        &r,
        "KilledBySignal",
        137,
        Some("SIGKILL"),
        Some("other_container"),
    );
    assert_eq!(r["sender"]["container"], "killer", "{r:#}");
    assert_eq!(r["sender"]["pod"], "shared", "{r:#}");
    expect.push(("shared", "app", "KilledBySignal"));

    say("a SIGSEGV crash");
    cleanup.pods.push("segv".into());
    apply(
        "segv",
        "exited",
        &pod(
            "segv",
            "",
            &[("app", "command: [\"podscope-helper\", \"crash\", \"segv\"]")],
        ),
    );
    let r = agent.record("segv", "app");
    assert_record(&r, "Crashed", 139, Some("SIGSEGV"), Some("kernel_fault"));
    expect.push(("segv", "app", "Crashed"));

    say("a host process kills a container's PID 1");
    cleanup.pods.push("victim".into());
    let status = apply(
        "victim",
        "running",
        &pod(
            "victim",
            "",
            &[(
                "app",
                "command: [\"podscope-helper\", \"sigterm\", \"ignore\"]",
            )],
        ),
    );
    let pid = main_pid(&status);
    // The helper is running (it has set its disposition), so the SIGKILL
    // reaches the container's main process, not runc's bootstrap.
    wait_until("the main process ignores SIGTERM", 30, || {
        support::sigterm_disposition_set(pid, false)
    });
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let r = agent.record("victim", "app");
    assert_record(
        &r,
        "KilledBySignal",
        137,
        Some("SIGKILL"),
        Some("host_process"),
    );
    assert_eq!(r["sender"]["pid"], std::process::id(), "{r:#}");
    expect.push(("victim", "app", "KilledBySignal"));

    say("a node-wide OOM: memory runs out in the cgroup above the pods");
    match besteffort_limit_file() {
        None if required() => panic!(
            "no kubepods/besteffort memory cgroup on the test node, so the node-wide OOM cannot be tested"
        ),
        None => support::say_skipped(
            "terminations_are_explained/node-oom",
            "no kubepods/besteffort memory cgroup (the test node's layout is unknown)",
        ),
        Some(file) => {
            cleanup.pods.push("node-oom".into());
            apply(
                "node-oom",
                "running",
                &pod(
                    "node-oom",
                    "",
                    &[(
                        "app",
                        "command: [\"sh\", \"-c\", \"sleep 2; exec podscope-helper alloc 128 --hold 60\"]",
                    )],
                ),
            );
            // Only this test's pods are BestEffort now: the bound affects nothing else.
            cleanup.limit_file = Some(file.clone());
            std::fs::write(&file, (64u64 << 20).to_string()).unwrap();
            let r = agent.record("node-oom", "app");
            assert_record(
                &r,
                "NodeOOMKilled",
                137,
                Some("SIGKILL"),
                Some("oom_killer"),
            );
            assert_eq!(r["oom"]["scope"], "node", "{r:#}");
            assert_eq!(r["oom"]["cgroup"], "/kubepods/besteffort", "{r:#}");
            expect.push(("node-oom", "app", "NodeOOMKilled"));
        }
    }

    say("the metrics agree");
    let m = agent.metrics();
    for (p, c, reason) in &expect {
        let labels = [
            ("namespace", NS),
            ("pod", *p),
            ("container", *c),
            ("reason", *reason),
        ];
        assert_eq!(
            metric(&m, "podscope_container_terminations_total", &labels),
            1.0,
            "{p}/{c} {reason}"
        );
        assert!(
            metric(
                &m,
                "podscope_container_last_termination_timestamp_seconds",
                &labels
            ) > 1.7e9
        );
    }
    assert_eq!(
        metric(
            &m,
            "podscope_container_runtime_contradictions_total",
            &[
                ("namespace", NS),
                ("pod", "oom-then-exit"),
                ("container", "app"),
                ("reason", "Error"),
                ("runtime_reason", "OOMKilled"),
            ]
        ),
        1.0
    );
    let w = [
        ("namespace", NS),
        ("pod", "worker-oom"),
        ("container", "app"),
    ];
    assert_eq!(
        metric(
            &m,
            "podscope_container_background_deaths_total",
            &[w[0], w[1], w[2], ("cause", "oom_killed")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "podscope_oom_kills_total",
            &[w[0], w[1], w[2], ("scope", "container")]
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "podscope_container_terminations_total", &w),
        0.0,
        "PID 1 survived"
    );
    let b = [
        ("namespace", NS),
        ("pod", "bg-killed"),
        ("container", "app"),
        ("cause", "killed"),
    ];
    assert_eq!(
        metric(&m, "podscope_container_background_deaths_total", &b),
        1.0
    );

    say("records survive an agent restart");
    let before = agent.why("hog");
    agent.stop();
    let agent = Agent::start(NS, &state, &[]);
    let after = agent.why("hog");
    assert_eq!(before["terminations"], after["terminations"]);
    assert_eq!(
        agent.record("stubborn", "app")["reason"],
        "KilledAfterGracePeriod"
    );

    // The split write is a fault-injection switch, compiled into test
    // builds only (`cargo xtask test` builds with it).
    if !cfg!(feature = "fault-injection") {
        assert!(
            !required(),
            "the torn-write scenario needs --features podscope/fault-injection"
        );
        support::say_skipped(
            "terminations_are_explained (torn write)",
            "built without the fault-injection feature",
        );
        agent.stop();
        return;
    }
    say("an agent killed in the middle of a journal write loses only that record");
    agent.stop();
    let journal = state.join("terminations.journal");
    let agent = Agent::start(NS, &state, &[("PODSCOPE_JOURNAL_SPLIT_WRITE_MS", "5000")]);
    let size_before = std::fs::metadata(&journal).unwrap().len();
    cleanup.pods.push("torn".into());
    apply(
        "torn",
        "exited",
        &pod(
            "torn",
            "",
            &[("main", "command: [\"sh\", \"-c\", \"exit 5\"]")],
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&journal).unwrap().len() == size_before {
        assert!(Instant::now() < deadline, "the journal write began");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Half a frame is on disk, the rest 5 s away: kill it now.
    agent.kill9();
    let agent = Agent::start(NS, &state, &[]);
    assert_eq!(
        agent.why("hog")["terminations"],
        after["terminations"],
        "earlier records intact"
    );
    assert_eq!(
        agent.why("torn")["terminations"].as_array().unwrap().len(),
        0,
        "the torn record is gone"
    );
    // Counted once the agent has updated its metrics (about a second).
    let mut m = String::new();
    wait_until("the cut journal write is counted", 30, || {
        m = agent.metrics();
        metric(&m, "podscope_journal_recovered_dropped_bytes_total", &[]) > 0.0
    });
    agent.stop();
    drop(cleanup);
}
