//! Attribution against real pods on the project's test node (containerd over
//! CRI, see testnode/): every exit names its namespace, pod and container.
//! Needs root. The scenarios share one node, so they run in sequence inside
//! one test.

mod support;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{apply, node, privileged, required, testnode};

const NS: &str = "podscope-attr";
const SOCKET: &str = "/run/podscope-node/containerd.sock";

fn pod(name: &str, containers: &[(&str, &str)]) -> String {
    let mut m = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n"
    );
    for (cname, script) in containers {
        m.push_str(&format!(
            "  - name: {cname}\n    command: [\"sh\", \"-c\", {script:?}]\n"
        ));
    }
    m
}

fn container_id(status: &Value, container: &str) -> String {
    status["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == container)
        .and_then(|c| c["container_id"].as_str())
        .unwrap_or_else(|| panic!("no id for {container} in {status}"))
        .to_string()
}

/// `podscope trace exits -o json` against the test node's CRI socket, its
/// lines on a channel.
struct Trace {
    child: Child,
    lines: mpsc::Receiver<Value>,
    stderr: std::thread::JoinHandle<String>,
}

impl Trace {
    fn start(extra: &[&str]) -> Trace {
        let mut child = Command::new(env!("CARGO_BIN_EXE_podscope"))
            .args([
                "trace",
                "exits",
                "-o",
                "json",
                "--cri-socket",
                SOCKET,
                "--log",
                "podscope=debug",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).expect("one JSON object per line");
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        // Ready once it says it attached.
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("attached") {
                    let _ = ready_tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("podscope attached");
        Trace {
            child,
            lines: rx,
            stderr,
        }
    }

    /// The first event matching `pred` within `timeout`.
    fn find(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return Some(v),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Stops with SIGTERM; returns what it printed on stderr.
    fn stop(mut self) -> String {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert_eq!(status.code(), Some(0));
        self.stderr.join().unwrap()
    }
}

fn is(v: &Value, comm: &str, code: i64) -> bool {
    v["comm"] == comm && v["exit_code"] == code && v["thread"] == false
}

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "pods: {msg}");
}

#[test]
fn exits_in_real_pods_are_attributed_to_their_pod_and_container() {
    if !privileged("exits_in_real_pods_are_attributed_to_their_pod_and_container") {
        return;
    }
    if testnode().is_none() {
        assert!(
            !required(),
            "podscope-testnode is not built: `cargo build --release -p testnode`"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED pod attribution: podscope-testnode is not built"
        );
        return;
    }
    node(&["up"]);
    let result = std::panic::catch_unwind(scenarios);
    for p in ["attr-a", "twin-1", "twin-2", "looper", "quick"] {
        let bin = testnode().unwrap();
        let _ = Command::new(bin)
            .args(["delete", &format!("{NS}/{p}")])
            .output();
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn scenarios() {
    let wait = Duration::from_secs(20);
    let trace = Trace::start(&[]);

    say("an exit inside a container names its pod and container");
    let a = apply(
        "attr-a",
        "running",
        &pod("attr-a", &[("main", "sleep 1; exit 7")]),
    );
    let a_id = container_id(&a, "main");
    let e = trace
        .find(wait, |v| is(v, "sh", 7) && v["pod"] == "attr-a")
        .expect("exit 7 from attr-a");
    assert_eq!(e["namespace"], NS);
    assert_eq!(e["container"], "main");
    assert_eq!(e["container_id"], a_id.as_str());
    assert_eq!(e["pod_uid"], a["uid"]);

    say("a container whose cgroup vanishes right after its exit");
    let q = apply("quick", "exited", &pod("quick", &[("blink", "exit 4")]));
    let e = trace.find(wait, |v| {
        is(v, "sh", 4) && v["container_id"] == container_id(&q, "blink").as_str()
    });
    let e = e.expect("the quick container's exit");
    assert_eq!(
        (
            e["namespace"].as_str(),
            e["pod"].as_str(),
            e["container"].as_str()
        ),
        (Some(NS), Some("quick"), Some("blink"))
    );

    say("two pods with identically named containers");
    let t1 = apply(
        "twin-1",
        "running",
        &pod("twin-1", &[("worker", "sleep 1; exit 11")]),
    );
    let t2 = apply(
        "twin-2",
        "running",
        &pod("twin-2", &[("worker", "sleep 1; exit 12")]),
    );
    let e11 = trace
        .find(wait, |v| is(v, "sh", 11) && v["namespace"] == NS)
        .expect("exit 11");
    let e12 = trace
        .find(wait, |v| is(v, "sh", 12) && v["namespace"] == NS)
        .expect("exit 12");
    assert_eq!(
        (e11["pod"].as_str(), e11["container_id"].as_str()),
        (Some("twin-1"), Some(container_id(&t1, "worker").as_str()))
    );
    assert_eq!(
        (e12["pod"].as_str(), e12["container_id"].as_str()),
        (Some("twin-2"), Some(container_id(&t2, "worker").as_str()))
    );

    say("a process started by exec inside a container");
    let l = apply(
        "looper",
        "running",
        &pod(
            "looper",
            &[("loop", "while true; do sh -c 'exit 9'; sleep 0.3; done")],
        ),
    );
    let loop_id = container_id(&l, "loop");
    let out = Command::new(testnode().unwrap())
        .args([
            "exec",
            &format!("{NS}/looper"),
            "loop",
            "--",
            "sh",
            "-c",
            "exit 5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "exec's own exit code");
    let e = trace
        .find(wait, |v| {
            is(v, "sh", 5) && v["container_id"] == loop_id.as_str()
        })
        .expect("the exec'd process's exit");
    assert_eq!(
        (e["pod"].as_str(), e["container"].as_str()),
        (Some("looper"), Some("loop"))
    );

    say("host processes stay the host's");
    Command::new("sh").args(["-c", "exit 6"]).status().unwrap();
    let e = trace.find(wait, |v| is(v, "sh", 6)).expect("host exit");
    assert!(
        e["pod"].is_null() && e["namespace"].is_null() && e["container_id"].is_null(),
        "{e}"
    );
    trace.stop();

    say("filters: -n and --pod show only that pod");
    let filtered = Trace::start(&["-n", NS, "--pod", "looper"]);
    let first = filtered
        .find(wait, |_| true)
        .expect("an event of the looper pod");
    assert_eq!(first["pod"], "looper");
    Command::new("sh").args(["-c", "exit 6"]).status().unwrap();
    let other = filtered.find(Duration::from_secs(2), |v| v["pod"] != "looper");
    assert!(
        other.is_none(),
        "an event of another pod or the host passed the filter: {other:?}"
    );
    filtered.stop();

    say("CRI down: identity from the cgroup path, counted; names return with the socket");
    node(&["containerd", "stop"]);
    let degraded = Trace::start(&[]);
    let e = degraded
        .find(wait, |v| {
            is(v, "sh", 9) && v["container_id"] == loop_id.as_str()
        })
        .expect("a looper exit without CRI");
    assert_eq!(
        e["pod_uid"], l["uid"],
        "the pod uid comes from the cgroup path"
    );
    assert!(
        e["pod"].is_null() && e["container"].is_null(),
        "no names without CRI: {e}"
    );
    node(&["containerd", "start"]);
    let named = degraded.find(Duration::from_secs(30), |v| {
        is(v, "sh", 9) && v["container"] == "loop"
    });
    assert!(
        named.is_some(),
        "names came back after containerd restarted"
    );
    let stderr = degraded.stop();
    assert_eq!(
        stderr.matches("cri degraded").count(),
        1,
        "the degradation is logged once: {stderr}"
    );
    assert_eq!(
        stderr.matches("cri recovered").count(),
        1,
        "and its end once: {stderr}"
    );
    let errors: u64 = stderr
        .split("attribution: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(errors >= 1, "CRI errors are counted: {stderr}");
}
