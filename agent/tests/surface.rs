//! The agent's user-visible surface against real pods on the test node, as
//! a user or Prometheus meets it: the configuration's environment layer,
//! `/api/v1/events` and its filters, OpenMetrics for Prometheus' `Accept`
//! header (checked by Prometheus' own OpenMetrics parser), series removed
//! after the retention and refused beyond `--max-series` (through /metrics),
//! `trace signals|oom|terminations` and `why` in their human form, and the
//! senders `kubelet`, `kernel` and `pid_namespace_teardown`. Needs root and
//! the test node; the scenarios share it, so they run in sequence.

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;
use support::{apply, free_port, get, node, privileged, required, testnode, wait_until};

const NS: &str = "podscope-surface";
const SOCKET: &str = "/run/podscope-node/containerd.sock";

/// What Prometheus 3 sends when it scrapes (scrape_protocols' default order).
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "surface: {msg}");
}

fn pod(name: &str, extra: &str, containers: &[(&str, &str)]) -> String {
    let mut m = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n{extra}  containers:\n"
    );
    for (c, spec) in containers {
        m.push_str(&format!("  - name: {c}\n    {spec}\n"));
    }
    m
}

/// A `podscope agent` on loopback, its node-wide API on a socket of its
/// own, ended by SIGTERM (or killed on drop).
struct Agent {
    child: Child,
    port: u16,
    socket: PathBuf,
}

impl Agent {
    fn start(cmd: &mut Command, port: u16, state: &Path) -> Agent {
        let socket = support::api_socket(state);
        let child = cmd
            .arg("--api-socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent = Agent {
            child,
            port,
            socket,
        };
        wait_until("the agent is ready", 60, || {
            get(port, "/readyz").is_some_and(|r| r.0 == 200)
        });
        agent
    }

    fn metrics(&self) -> String {
        get(self.port, "/metrics").expect("/metrics answers").1
    }

    /// `podscope why NS/POD` as JSON, or in its human form.
    fn why(&self, pod: &str, json: bool) -> String {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_podscope"));
        cmd.args(["why", &format!("{NS}/{pod}")])
            .arg("--agent")
            .arg(&self.socket);
        if json {
            cmd.args(["-o", "json"]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "why failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The newest record of a container, or a background death there, waiting for it.
    fn find(&self, pod: &str, list: &str, container: &str) -> Value {
        let mut found = Value::Null;
        wait_until(&format!("{list} of {pod}/{container}"), 60, || {
            let all: Value = serde_json::from_str(&self.why(pod, true)).unwrap();
            if let Some(r) = all[list]
                .as_array()
                .and_then(|a| a.iter().rev().find(|r| r["container"] == container))
            {
                found = r.clone();
            }
            !found.is_null()
        });
        found
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Values of the samples of `name` whose labels include all of `labels`.
fn samples(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (have, v) = match rest.strip_prefix('{') {
                Some(r) => r.rsplit_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            labels
                .iter()
                .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"")))
                .then(|| v.trim().parse().ok())?
        })
        .collect()
}

/// A GET with extra header lines: (status, headers, body).
fn get_with(port: u16, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_lowercase(), body.to_string())
}

/// A streaming GET of /api/v1/events over the agent's socket: its NDJSON
/// lines on a channel.
fn stream(socket: &Path, query: &str) -> mpsc::Receiver<String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        s,
        "GET /api/v1/events?{query} HTTP/1.0\r\nHost: localhost\r\n\r\n"
    )
    .unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut body = false;
        for line in BufReader::new(s).lines().map_while(Result::ok) {
            if body && !line.is_empty() {
                let _ = tx.send(line);
            } else if line.is_empty() {
                body = true;
            }
        }
    });
    rx
}

/// `podscope trace FAMILY -n NS` in its human form, until SIGINT; its
/// output gathered by a thread.
struct Trace {
    child: Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Trace {
    /// Started, and attached: it printed its header (after attaching its
    /// probes and its SIGINT handler).
    fn start(family: &str) -> Trace {
        let mut child = Command::new(env!("CARGO_BIN_EXE_podscope"))
            .args(["trace", family, "-n", NS, "--cri-socket", SOCKET])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let t = Trace {
            child,
            out,
            reader: Some(reader),
        };
        wait_until(&format!("trace {family} attaches"), 60, || {
            !t.out.lock().unwrap().is_empty()
        });
        t
    }

    fn finish(mut self) -> String {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.out.lock().unwrap().clone()
    }
}

impl Drop for Trace {
    /// A test that failed halfway leaves no trace running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The init of `pid`'s PID namespace (the pod's pause with a shared namespace).
fn namespace_init(pid: i64) -> Option<i32> {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let p: i32 = e.file_name().to_str()?.parse().ok()?;
        (std::fs::read_link(e.path().join("ns/pid")).ok()? == ns).then_some(())?;
        let status = std::fs::read_to_string(e.path().join("status")).ok()?;
        let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
        (nspid.split_whitespace().last()? == "1").then_some(p)
    })
}

fn openmetrics_parser() -> Option<PathBuf> {
    let py = xtask::toolchain::python_venv().join("bin/python3");
    let ok = Command::new(&py)
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

/// Prometheus' OpenMetrics parser on `text`: "family type samples" lines.
fn parse_openmetrics(py: &Path, text: &str) -> String {
    const SCRIPT: &str = "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\nfor f in p(sys.stdin.read()):\n    print(f.name, f.type, len(f.samples))\n";
    let mut child = Command::new(py)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "Prometheus' OpenMetrics parser refused the exposition: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Cleanup(Vec<String>, PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(bin) = testnode() {
            for p in &self.0 {
                let _ = Command::new(&bin)
                    .args(["delete", &format!("{NS}/{p}")])
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[test]
fn the_agent_surface_on_real_pods() {
    let test = "the_agent_surface_on_real_pods";
    if !privileged(test) {
        return;
    }
    if testnode().is_none() {
        assert!(!required(), "podscope-testnode is not built");
        support::say_skipped(test, "podscope-testnode is not built");
        return;
    }
    let Some(python) = openmetrics_parser() else {
        let why = "Prometheus' Python client (its OpenMetrics parser) is not installed: run `cargo xtask setup`";
        assert!(!required(), "{why}");
        support::say_skipped(test, why);
        return;
    };
    node(&["up"]);
    let dir = std::env::temp_dir().join(format!("podscope-surface-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cleanup = Cleanup(vec![], dir.clone());

    say("configuration: the environment beats the file (tests/cli.rs: the flag beats both)");
    let (file_port, env_port) = (free_port(), free_port());
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:{file_port}\"\nseries-retention = \"1h\"\n"),
    )
    .unwrap();
    let agent = Agent::start(
        Command::new(env!("CARGO_BIN_EXE_podscope"))
            .args(["agent", "--cri-socket", SOCKET, "--state-dir"])
            .arg(dir.join("state"))
            .env("PODSCOPE_CONFIG", &config)
            .env("PODSCOPE_LISTEN", format!("127.0.0.1:{env_port}"))
            // The retention from the environment: 3 s, not the file's hour
            // (checked below, when a deleted pod's series go away).
            .env("PODSCOPE_SERIES_RETENTION", "3s"),
        env_port,
        &dir.join("state"),
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", file_port)).is_err(),
        "the agent listens on the file's port though PODSCOPE_LISTEN is set"
    );

    say("the events stream, filtered by pod and by container, on the agent's socket");
    let by_pod = stream(&agent.socket, &format!("namespace={NS}&pod=ev-a"));
    let by_container = stream(&agent.socket, &format!("namespace={NS}&container=victim"));
    let (status, body) = support::get_unix(&agent.socket, "/api/v1/events?podname=x").unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("namespace, pod, container"), "{body}");
    // Not on the metrics listener (tests/api.rs: from another address too).
    let (status, _, body) = get_with(env_port, &format!("/api/v1/events?namespace={NS}"), "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains(agent.socket.to_str().unwrap()), "{body}");
    let traces = [
        Trace::start("signals"),
        Trace::start("oom"),
        Trace::start("terminations"),
    ];

    for (name, code) in [("ev-a", 3), ("ev-b", 4)] {
        cleanup.0.push(name.into());
        apply(
            name,
            "exited",
            &pod(
                name,
                "",
                &[(
                    "main",
                    &format!("command: [\"sh\", \"-c\", \"exit {code}\"]"),
                )],
            ),
        );
    }

    say("senders: kubelet (a host thread named kubelet kills PID 1)");
    cleanup.0.push("by-kubelet".into());
    let status = apply(
        "by-kubelet",
        "running",
        &pod(
            "by-kubelet",
            "",
            &[(
                "victim",
                "command: [\"podscope-helper\", \"sigterm\", \"ignore\"]",
            )],
        ),
    );
    let pid = status["containers"][0]["pid"].as_i64().unwrap();
    wait_until("the victim ignores SIGTERM", 30, || {
        support::sigterm_disposition_set(pid, false)
    });
    std::thread::Builder::new()
        .name("kubelet".into())
        .spawn(move || assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0))
        .unwrap()
        .join()
        .unwrap();
    let r = agent.find("by-kubelet", "terminations", "victim");
    assert_eq!(r["sender"]["kind"], "kubelet", "{r:#}");
    assert_eq!(r["signal"], "SIGKILL", "{r:#}");

    say("senders: kernel (a CPU rlimit kills a worker)");
    cleanup.0.push("rlimit".into());
    apply(
        "rlimit",
        "running",
        &pod(
            "rlimit",
            "",
            &[(
                "app",
                "command: [\"sh\", \"-c\", \"ulimit -t 1; podscope-helper spin 1; sleep 600\"]",
            )],
        ),
    );
    let d = agent.find("rlimit", "background_deaths", "app");
    assert_eq!(d["sender"]["kind"], "kernel", "{d:#}");
    assert_eq!(d["comm"], "podscope-helper", "{d:#}");

    say("senders: pid_namespace_teardown (the pod's init dies under a shared namespace)");
    cleanup.0.push("teardown".into());
    let status = apply(
        "teardown",
        "running",
        &pod(
            "teardown",
            "  shareProcessNamespace: true\n",
            &[(
                "app",
                "command: [\"podscope-helper\", \"sigterm\", \"ignore\"]",
            )],
        ),
    );
    let pid = status["containers"][0]["pid"].as_i64().unwrap();
    wait_until("the app ignores SIGTERM", 30, || {
        support::sigterm_disposition_set(pid, false)
    });
    let init = namespace_init(pid).expect("the pod's pause, init of its PID namespace");
    assert_ne!(i64::from(init), pid);
    assert_eq!(unsafe { libc::kill(init, libc::SIGKILL) }, 0);
    let r = agent.find("teardown", "terminations", "app");
    assert_eq!(r["sender"]["kind"], "pid_namespace_teardown", "{r:#}");

    say("an OOM kill, for trace oom and why");
    cleanup.0.push("oom".into());
    apply(
        "oom",
        "exited",
        &pod(
            "oom",
            "",
            &[(
                "app",
                "command: [\"podscope-helper\", \"alloc\", \"64\", \"--hold\", \"60\"]\n    resources: {limits: {memory: 32Mi}}",
            )],
        ),
    );
    let r = agent.find("oom", "terminations", "app");
    assert_eq!(r["reason"], "OOMKilled", "{r:#}");

    say("a throttle by a pod-level quota is flagged as an ancestor's");
    cleanup.0.push("pod-quota".into());
    let status = apply(
        "pod-quota",
        "running",
        &pod(
            "pod-quota",
            "",
            &[("spin", "command: [\"podscope-helper\", \"spin\", \"1\"]")],
        ),
    );
    // kubelet puts the sum of the containers' limits on the pod's cgroup;
    // here the pod's cgroup gets 0.2 cores and the container none of its own.
    let parent = status["cgroup_parent"]
        .as_str()
        .unwrap()
        .trim_start_matches('/');
    let (quota_file, quota, unlimited) = {
        let v1 = Path::new("/sys/fs/cgroup/cpu")
            .join(parent)
            .join("cpu.cfs_quota_us");
        if v1.exists() {
            (v1, "20000", "-1")
        } else {
            (
                Path::new("/sys/fs/cgroup").join(parent).join("cpu.max"),
                "20000 100000",
                "max 100000",
            )
        }
    };
    std::fs::write(&quota_file, quota).unwrap_or_else(|e| panic!("{}: {e}", quota_file.display()));
    let out = Command::new(env!("CARGO_BIN_EXE_podscope"))
        .args([
            "trace",
            "throttle",
            "-o",
            "json",
            "--duration",
            "3s",
            "-n",
            NS,
        ])
        .args(["--pod", "pod-quota", "--cri-socket", SOCKET])
        .output()
        .unwrap();
    let _ = std::fs::write(&quota_file, unlimited);
    assert!(out.status.success(), "{out:?}");
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        !events.is_empty(),
        "no throttle under a 0.2-core pod quota (load average {})",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
    );
    for e in &events {
        assert_eq!(e["container"], "spin", "{e}");
        assert_eq!(
            e["ancestor"], true,
            "the container has no quota of its own: {e}"
        );
    }

    say("why, as a person reads it");
    let human = agent.why("oom", false);
    assert!(
        human.starts_with(&format!("{NS}/oom container app: OOMKilled\n")),
        "{human}"
    );
    assert!(human.contains("sender: oom_killer"), "{human}");
    let human = agent.why("rlimit", false);
    assert!(
        human.contains("Processes that died while their container kept running"),
        "{human}"
    );
    assert!(human.contains("sent by kernel"), "{human}");

    say("trace signals, oom and terminations, as a person reads them");
    let [signals, oom, terminations] = traces.map(Trace::finish);
    let row = |out: &str, words: &[&str]| out.lines().any(|l| words.iter().all(|w| l.contains(w)));
    assert!(
        signals.starts_with("TIME") && signals.lines().next().unwrap().contains("SENDER"),
        "{signals}"
    );
    assert!(
        row(
            &signals,
            &["SIGKILL", &format!("{NS}/by-kubelet"), "victim"]
        ),
        "{signals}"
    );
    assert!(oom.lines().next().unwrap_or("").contains("VICTIM"), "{oom}");
    assert!(
        row(&oom, &[&format!("{NS}/oom"), "app", "container"]),
        "{oom}"
    );
    assert!(
        terminations.lines().next().unwrap_or("").contains("REASON"),
        "{terminations}"
    );
    assert!(
        row(&terminations, &[&format!("{NS}/oom"), "OOMKilled", "137"]),
        "{terminations}"
    );
    assert!(
        row(&terminations, &[&format!("{NS}/ev-a"), "Error", "3"]),
        "{terminations}"
    );

    say("the filtered streams carry their pod or container only");
    let lines = |rx: mpsc::Receiver<String>| -> Vec<String> {
        let mut v = vec![];
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
            v.push(l);
        }
        v
    };
    let a = lines(by_pod);
    assert!(
        a.iter().any(|l| {
            let e: Value = serde_json::from_str(l).unwrap();
            e["kind"] == "exit" && e["exit_code"] == 3
        }),
        "no exit 3 of ev-a in its stream: {a:#?}"
    );
    assert!(a.iter().all(|l| l.contains("\"ev-a\"")), "{a:#?}");
    let v = lines(by_container);
    assert!(!v.is_empty(), "nothing in the container's stream");
    assert!(v.iter().all(|l| l.contains("\"victim\"")), "{v:#?}");

    say("OpenMetrics for Prometheus' Accept header, by Prometheus' own parser");
    let (status, head, body) = get_with(
        env_port,
        "/metrics",
        &format!("Accept: {PROMETHEUS_ACCEPT}\r\n"),
    );
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    let families = parse_openmetrics(&python, &body);
    assert!(
        families
            .lines()
            .any(|l| l.starts_with("podscope_process_exits counter ")),
        "{families}"
    );
    let (_, head, _) = get_with(env_port, "/metrics", "Accept: text/plain\r\n");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );

    say("a deleted pod's series go after the retention (3 s, from the environment)");
    let exits_of = |m: &str, p: &str| {
        samples(
            m,
            "podscope_process_exits_total",
            &[("namespace", NS), ("pod", p)],
        )
    };
    wait_until("ev-a's and ev-b's exits are counted", 30, || {
        let m = agent.metrics();
        !exits_of(&m, "ev-a").is_empty() && !exits_of(&m, "ev-b").is_empty()
    });
    node(&["delete", &format!("{NS}/ev-a"), "--wait"]);
    wait_until("ev-a's series are removed", 60, || {
        exits_of(&agent.metrics(), "ev-a").is_empty()
    });
    assert!(
        !exits_of(&agent.metrics(), "ev-b").is_empty(),
        "the series of ev-b, which still exists, went too"
    );
    drop(agent);

    say("--max-series 1: more series are refused and counted, through a scrape");
    let port = free_port();
    let agent = Agent::start(
        Command::new(env!("CARGO_BIN_EXE_podscope"))
            .args(["agent", "--cri-socket", SOCKET, "--max-series", "1"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir"])
            .arg(dir.join("state-2")),
        port,
        &dir.join("state-2"),
    );
    for (name, code) in [("cap-a", 5), ("cap-b", 6)] {
        cleanup.0.push(name.into());
        apply(
            name,
            "exited",
            &pod(
                name,
                "",
                &[(
                    "main",
                    &format!("command: [\"sh\", \"-c\", \"exit {code}\"]"),
                )],
            ),
        );
    }
    let mut m = String::new();
    wait_until("series are refused", 30, || {
        m = agent.metrics();
        samples(&m, "podscope_series_refused_total", &[])
            .first()
            .is_some_and(|v| *v >= 1.0)
    });
    let ours = ["cap-a", "cap-b"]
        .iter()
        .filter(|p| !exits_of(&m, p).is_empty())
        .count();
    // The cap holds for the exits family at least, whichever pod (or other
    // workload on the node) came first.
    assert!(ours <= 1, "both pods got series under --max-series 1:\n{m}");
    drop(agent);
    drop(cleanup);
}
