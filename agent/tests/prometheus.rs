//! End to end with a real Prometheus: `podscope agent` runs against the test
//! node, Debian's Prometheus scrapes it on loopback every second, pods exit
//! in known ways, and PromQL through Prometheus's HTTP API returns the
//! expected per-pod counts. Also: `promtool check metrics` on the exposition,
//! and SIGTERM ends the agent cleanly. Needs root.

mod support;

use std::{
    collections::HashMap,
    io::Write,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{free_port, get, privileged, required, testnode};

const NS: &str = "podscope-prom";
const SOCKET: &str = "/run/podscope-node/containerd.sock";

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Everything the test started or made, removed even when it fails.
struct Killer(Vec<Child>, Vec<PathBuf>);

fn delete_pods(node: &PathBuf) {
    for p in ["exits-a", "exits-b"] {
        let _ = Command::new(node)
            .args(["delete", &format!("{NS}/{p}"), "--wait"])
            .output();
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        if let Some(node) = testnode() {
            delete_pods(&node);
        }
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.1 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

#[test]
fn prometheus_scrapes_per_pod_exit_counts() {
    if !privileged("prometheus_scrapes_per_pod_exit_counts") {
        return;
    }
    let Some(node) = testnode() else {
        assert!(!required(), "podscope-testnode is not built");
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED prometheus e2e: podscope-testnode is not built"
        );
        return;
    };
    if !which("prometheus") || !which("promtool") {
        assert!(
            !required(),
            "prometheus and promtool are needed: `cargo xtask setup` installs Debian's prometheus"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED prometheus e2e: prometheus is not installed"
        );
        return;
    }
    let run = |args: &[&str]| {
        let out = Command::new(&node).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "testnode {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["up"]);
    // Pods left by an earlier, interrupted run would not exit again.
    delete_pods(&node);
    let scratch = std::env::temp_dir().join(format!("podscope-prom-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let mut guard = Killer(vec![], vec![scratch.clone()]);

    let agent_port = free_port();
    let agent = Command::new(env!("CARGO_BIN_EXE_podscope"))
        .args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{agent_port}"),
            "--cri-socket",
            SOCKET,
            // The packet probes watch the node's namespace, not the machine's.
            "--netns",
            "/run/netns/podscope-node",
        ])
        .arg("--state-dir")
        .arg(scratch.join("state"))
        .arg("--api-socket")
        .arg(scratch.join("api.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    guard.0.push(agent);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(agent_port, "/readyz").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the agent did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }

    let prom_port = free_port();
    let config = scratch.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: podscope\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"
        ),
    )
    .unwrap();
    let prom = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            scratch.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    guard.0.push(prom);

    // Pod A: three children exit 2, one is SIGKILLed, then PID 1 exits 0.
    // Pod B: PID 1 exits 5.
    let manifest = |name: &str, container: &str, script: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: {container}\n    command: [\"sh\", \"-c\", {script:?}]\n"
        )
    };
    for (name, container, script) in [
        (
            "exits-a",
            "worker",
            "sleep 2; for i in 1 2 3; do sh -c 'exit 2'; done; sh -c 'kill -9 $$'; exit 0",
        ),
        ("exits-b", "main", "sleep 2; exit 5"),
    ] {
        let f = scratch.join(format!("{name}.yaml"));
        std::fs::write(&f, manifest(name, container, script)).unwrap();
        run(&["apply", "-f", f.to_str().unwrap()]);
    }

    // What Prometheus has, by (pod, container, outcome).
    let query = encode(&format!(
        "podscope_process_exits_total{{namespace=\"{NS}\"}}"
    ));
    let want = |got: &HashMap<(String, String, String), f64>| {
        let v = |p: &str, c: &str, o: &str| {
            got.get(&(p.into(), c.into(), o.into()))
                .copied()
                .unwrap_or(0.0)
        };
        v("exits-a", "worker", "error") == 3.0
            && v("exits-a", "worker", "signaled") == 1.0
            && v("exits-a", "worker", "ok") >= 1.0
            && v("exits-b", "main", "error") == 1.0
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = HashMap::new();
    while Instant::now() < deadline {
        if let Some((200, body)) = get(prom_port, &format!("/api/v1/query?query={query}")) {
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            got = v["data"]["result"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .map(|r| {
                            let m = &r["metric"];
                            let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
                            (
                                (s("pod"), s("container"), s("outcome")),
                                r["value"][1].as_str().unwrap_or("0").parse().unwrap_or(0.0),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            if want(&got) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(want(&got), "Prometheus has {got:?}");

    // The exposition passes promtool's checks.
    let (status, exposition) = get(agent_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "podscope_events_total",
        "podscope_events_lost_total",
        "podscope_probe_attached",
        "podscope_tracked_containers",
        "podscope_build_info",
    ] {
        assert!(exposition.contains(name), "{name} missing from /metrics");
    }
    // The agent's own memory: its counted heap is real (non-zero, inside its
    // resident size), and the tables it keeps show the pods it just saw.
    let sample = |name: &str| {
        exposition
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no sample {name} in /metrics"))
    };
    let heap = sample("podscope_agent_heap_bytes");
    let resident = sample("podscope_agent_resident_memory_bytes");
    assert!(
        heap > 64.0 * 1024.0 && heap < resident,
        "heap {heap} bytes, resident {resident} bytes"
    );
    // Two pods of one container each: their pod, container and pause
    // cgroups (ended ones are kept for the retention).
    assert!(
        sample("podscope_agent_table_entries{table=\"cgroups\"}") >= 4.0,
        "{exposition}"
    );
    assert!(
        sample("podscope_agent_table_entries{table=\"forensics_containers\"}") >= 1.0,
        "{exposition}"
    );

    // SIGTERM: probes detached, exit 0 within 5 s.
    let mut agent = guard.0.remove(0);
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = agent.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the agent did not exit within 5 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}
