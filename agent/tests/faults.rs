//! "Never blind": real faults of the agent's outside dependencies, each with
//! a 20,000-process exit storm running through the probes meanwhile. Each
//! asserts what an SRE relies on: `/healthz` answers within 1 s
//! throughout, every exit of the storm is seen (or a loss counter accounts
//! for it), the degradation is counted and reported by `/readyz`, the
//! metrics and `podscope doctor`, the feature recovers when the fault ends,
//! and SIGTERM ends the agent within 2 s. Needs root (and the test node for
//! the CRI and journal faults).

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use support::{free_port, get, privileged, required, testnode};

const SOCKET: &str = "/run/podscope-node/containerd.sock";
const STORM: usize = 20_000;
/// Every storm child exits with this status: how its exits are told apart.
const STORM_CODE: i32 = 7;

/// A running `podscope agent` on a free loopback port, its node-wide API
/// on a socket of its own, ended by its PID.
struct Agent {
    child: Option<Child>,
    port: u16,
    socket: PathBuf,
}

impl Agent {
    fn start(args: &[&str], env: &[(&str, String)], state: &Path) -> Agent {
        let port = free_port();
        let socket = support::api_socket(state);
        let mut child = Command::new(env!("CARGO_BIN_EXE_podscope"))
            .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--state-dir", state.to_str().unwrap()])
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        support::wait_attached(&mut child, Some("agent: "));
        Agent {
            child: Some(child),
            port,
            socket,
        }
    }

    /// A GET on the metrics listener: its body.
    fn get(&self, path: &str) -> String {
        get(self.port, path).map(|(_, b)| b).unwrap_or_default()
    }

    /// A GET of the node-wide API, on the agent's socket: (status, body).
    fn api(&self, path: &str) -> (u16, String) {
        support::get_unix(&self.socket, path).unwrap_or_default()
    }

    /// The sum of a metric's samples whose line contains every `filter`.
    fn metric(&self, name: &str, filters: &[&str]) -> f64 {
        self.get("/metrics")
            .lines()
            .filter(|l| l.starts_with(name) && filters.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Polls a metric (updated once a second) until it has `value`.
    fn metric_until(&self, name: &str, filters: &[&str], value: f64) {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(name, filters);
            if v == value {
                return;
            }
            assert!(
                Instant::now() < until,
                "{name}{filters:?} is {v}, not {value}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls `/readyz` until `pred` holds of its body.
    fn readyz_until(&self, what: &str, deadline: Duration, pred: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + deadline;
        loop {
            let body = self.get("/readyz");
            if pred(&body) {
                return body;
            }
            assert!(Instant::now() < until, "{what}: /readyz says {body:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `podscope doctor` asking this agent: its `agent` check.
    fn doctor_agent_check(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_podscope"))
            .args([
                "doctor",
                "-o",
                "json",
                "--agent",
                self.socket.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "agent")
            .cloned()
            .expect("doctor has an agent check")
    }

    /// SIGTERM; returns how long the agent took to exit.
    fn terminate(mut self) -> Duration {
        let mut child = self.child.take().unwrap();
        let t = Instant::now();
        // SAFETY: kill(2) on the PID of the child this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                assert!(st.success(), "the agent exited with {st}");
                return t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                return t.elapsed();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
            // A killed agent leaves its socket.
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// `/healthz` asked every 100 ms from a thread: the worst answer time, and
/// the answers that never came.
struct HealthWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Duration, u64, u64)>,
}

impl HealthWatch {
    fn start(port: u16) -> HealthWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut worst, mut failed, mut asked) = (Duration::ZERO, 0u64, 0u64);
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = healthz(port);
                worst = worst.max(t.elapsed());
                asked += 1;
                failed += u64::from(!ok);
                std::thread::sleep(Duration::from_millis(100));
            }
            (worst, failed, asked)
        });
        HealthWatch { stop, thread }
    }

    /// Asserts every answer came, within 1 s.
    fn check(self, fault: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (worst, failed, asked) = self.thread.join().unwrap();
        eprintln!("{fault}: /healthz asked {asked} times, worst {worst:?}, {failed} failed");
        assert_eq!(
            failed, 0,
            "{fault}: /healthz did not answer {failed} of {asked} times"
        );
        assert!(asked > 10, "{fault}: /healthz was hardly asked");
        assert!(
            worst < Duration::from_secs(1),
            "{fault}: /healthz took {worst:?}"
        );
    }
}

fn healthz(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200")
}

/// Reads `/api/v1/events` (on the agent's socket) and counts the storm's
/// exits (children of this process that exited with [`STORM_CODE`]).
struct StormReader {
    seen: Arc<AtomicU64>,
}

impl StormReader {
    fn open(socket: &Path) -> StormReader {
        let seen = Arc::new(AtomicU64::new(0));
        let s = seen.clone();
        let mut conn = UnixStream::connect(socket).unwrap();
        write!(conn, "GET /api/v1/events HTTP/1.0\r\n\r\n").unwrap();
        // The handler subscribes before it answers: once the headers are
        // here, every later event reaches this reader.
        let mut reader = BufReader::new(conn);
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                reader.read_line(&mut line).unwrap() > 0,
                "the stream closed"
            );
            if line == "\r\n" {
                break;
            }
        }
        let ppid = format!("\"ppid\":{},", std::process::id());
        let code = format!("\"exit_code\":{STORM_CODE},");
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                if line.contains("\"kind\":\"exit\"")
                    && line.contains(&ppid)
                    && line.contains(&code)
                {
                    s.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        StormReader { seen }
    }

    fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}

/// Forks `n` children that exit at once with [`STORM_CODE`], reaping each.
fn storm(n: usize) {
    for _ in 0..n {
        // SAFETY: the child only calls _exit (async-signal-safe).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe { libc::_exit(STORM_CODE) };
        }
        assert!(pid > 0, "fork failed");
        let mut st = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
    }
}

/// Runs the storm and asserts each of its exits reached a reader of the
/// event stream, or that a loss counter accounts for the missing ones.
fn storm_is_seen(agent: &Agent, reader: &StormReader, fault: &str) {
    let lost0 = agent.metric("podscope_events_lost_total", &["source=\"exits\""]);
    let dropped0 = agent.metric("podscope_stream_events_dropped_total", &[]);
    let before = reader.seen();
    storm(STORM);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = reader.seen() - before;
        if seen == STORM as u64 {
            break;
        }
        let lost = agent.metric("podscope_events_lost_total", &["source=\"exits\""]) - lost0;
        let dropped = agent.metric("podscope_stream_events_dropped_total", &[]) - dropped0;
        if Instant::now() > deadline {
            assert!(
                seen as f64 + lost + dropped >= STORM as f64,
                "{fault}: {seen} of {STORM} storm exits seen, {lost} lost in the kernel, {dropped} dropped by the stream"
            );
            eprintln!(
                "{fault}: {seen} seen, {lost} lost (kernel), {dropped} dropped (stream): all accounted"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn state_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("podscope-faults-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A fake `iptables-save` (and its backend variants) on PATH: hangs while
/// the file `hang` exists, then prints a small kube-proxy dump.
fn fake_rules_tools(dir: &Path) {
    let dump = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]\n-A KUBE-SERVICES -d 198.19.0.10/32 -p tcp -m comment --comment \"faults/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA\n-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB\n-A KUBE-SEP-BBBBBBBBBBBBBBBB -p tcp -m tcp -j DNAT --to-destination 198.18.0.5:8080\nCOMMIT\n";
    std::fs::write(dir.join("dump"), dump).unwrap();
    let script = format!(
        "#!/bin/sh\nwhile [ -e {hang} ]; do sleep 1; done\nexec cat {dump}\n",
        hang = dir.join("hang").display(),
        dump = dir.join("dump").display()
    );
    for tool in ["iptables-save", "iptables-nft-save", "iptables-legacy-save"] {
        let p = dir.join(tool);
        std::fs::write(&p, &script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Processes whose command line mentions `marker` (the fake tool's dir).
fn processes_mentioning(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .count()
}

#[test]
fn a_hanging_rules_tool_degrades_service_names_only() {
    if !privileged("a_hanging_rules_tool_degrades_service_names_only") {
        return;
    }
    let tools = state_dir("tools");
    fake_rules_tools(&tools);
    std::fs::write(tools.join("hang"), "").unwrap();
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let state = state_dir("rules");
    let agent = Agent::start(
        &["--no-cri", "--rules-timeout", "1s"],
        &[("PATH", path)],
        &state,
    );
    let watch = HealthWatch::start(agent.port);
    let reader = StormReader::open(&agent.socket);
    storm_is_seen(&agent, &reader, "hanging iptables-save");
    let body = agent.readyz_until("rules degraded", Duration::from_secs(20), |b| {
        b.contains("[-]kube_proxy_rules degraded")
    });
    assert!(body.contains("did not finish within 1s"), "{body}");
    agent.metric_until(
        "podscope_dependency_degraded",
        &["dependency=\"kube_proxy_rules\""],
        1.0,
    );
    assert!(agent.metric("podscope_service_rules_errors_total", &[]) >= 1.0);
    let doctor = agent.doctor_agent_check();
    assert_eq!(doctor["status"], "missing", "{doctor}");
    assert!(
        doctor["detail"]
            .as_str()
            .unwrap()
            .contains("kube_proxy_rules"),
        "{doctor}"
    );
    // Hung reads were killed and reaped: at most the one in flight remains.
    assert!(
        processes_mentioning(tools.to_str().unwrap()) <= 1,
        "hung rules reads pile up"
    );
    // The tool recovers: Service names come back.
    std::fs::remove_file(tools.join("hang")).unwrap();
    agent.readyz_until("rules recovered", Duration::from_secs(30), |b| {
        b.contains("[+]kube_proxy_rules ok")
    });
    agent.metric_until(
        "podscope_dependency_degraded",
        &["dependency=\"kube_proxy_rules\""],
        0.0,
    );
    watch.check("hanging iptables-save");
    let took = agent.terminate();
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    let _ = std::fs::remove_dir_all(&tools);
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn half_sent_requests_and_a_slow_reader_slow_nobody() {
    if !privileged("half_sent_requests_and_a_slow_reader_slow_nobody") {
        return;
    }
    let state = state_dir("http");
    let agent = Agent::start(&["--no-cri"], &[], &state);
    // 200 clients that send half a request and then nothing, on the
    // metrics listener, and 100 more on the API's socket.
    let half: Vec<TcpStream> = (0..200)
        .filter_map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", agent.port)).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").ok()?;
            Some(s)
        })
        .collect();
    assert_eq!(half.len(), 200);
    let half_unix: Vec<UnixStream> = (0..100)
        .filter_map(|_| {
            let mut s = UnixStream::connect(&agent.socket).ok()?;
            s.write_all(b"GET /api/v1/terminations HTTP/1.1\r\nHost: x\r\n")
                .ok()?;
            Some(s)
        })
        .collect();
    assert_eq!(half_unix.len(), 100);
    // A reader on the API's socket that takes 1 KiB of the stream every 200 ms.
    let mut slow = UnixStream::connect(&agent.socket).unwrap();
    slow.write_all(b"GET /api/v1/events HTTP/1.0\r\n\r\n")
        .unwrap();
    let slow_stop = Arc::new(AtomicBool::new(false));
    let ss = slow_stop.clone();
    let slow_reader = std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while !ss.load(Ordering::Relaxed) {
            if slow.read(&mut buf).unwrap_or(0) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let watch = HealthWatch::start(agent.port);
    let reader = StormReader::open(&agent.socket);
    storm_is_seen(&agent, &reader, "half-sent requests and a slow reader");
    // The slow reader fell behind: its loss is counted, not anyone's wait.
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.metric("podscope_stream_events_dropped_total", &[]) == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the slow reader's missed events are not counted"
        );
        storm(2_000);
    }
    watch.check("half-sent requests and a slow reader");
    // The socket still answers while its half-sent clients wait.
    assert_eq!(agent.api("/api/v1/terminations?limit=1").0, 200);
    drop(half);
    drop(half_unix);
    slow_stop.store(true, Ordering::Relaxed);
    let _ = slow_reader.join();
    let took = agent.terminate();
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    let _ = std::fs::remove_dir_all(&state);
}

/// Resumes containerd even when the test fails half-way.
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        // SAFETY: kill(2) with SIGCONT on the test node's containerd.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The tests that use the test node take turns: one freezes containerd,
/// and a container that ends meanwhile in the other's pod would get a
/// record without names.
static NODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn node_turn() -> std::sync::MutexGuard<'static, ()> {
    NODE.lock().unwrap_or_else(|e| e.into_inner())
}

fn test_node_up(test: &str) -> Option<i32> {
    let Some(node) = testnode() else {
        assert!(!required(), "{test}: podscope-testnode is not built");
        support::say_skipped(test, "podscope-testnode is not built");
        return None;
    };
    let out = Command::new(&node).arg("up").output().unwrap();
    assert!(out.status.success(), "node up: {out:?}");
    let pid = std::fs::read_to_string("/run/podscope-node/containerd.pid")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    assert!(
        pid.is_some(),
        "{test}: the test node records no containerd PID"
    );
    pid
}

#[test]
fn a_frozen_runtime_costs_names_not_events() {
    let test = "a_frozen_runtime_costs_names_not_events";
    if !privileged(test) {
        return;
    }
    let _turn = node_turn();
    let Some(containerd) = test_node_up(test) else {
        return;
    };
    let state = state_dir("cri");
    let agent = Agent::start(&["--cri-socket", SOCKET], &[], &state);
    agent.readyz_until("CRI answers", Duration::from_secs(20), |b| {
        b.starts_with("ready") && b.contains("[+]cri ok")
    });
    let watch = HealthWatch::start(agent.port);
    let reader = StormReader::open(&agent.socket);
    // SAFETY: SIGSTOP to the test node's own containerd; Thaw resumes it.
    unsafe { libc::kill(containerd, libc::SIGSTOP) };
    let thaw = Thaw(containerd);
    let errors0 = agent.metric("podscope_cri_errors_total", &[]);
    storm_is_seen(&agent, &reader, "frozen containerd");
    let body = agent.readyz_until("CRI degraded", Duration::from_secs(30), |b| {
        b.contains("[-]cri degraded")
    });
    assert!(
        body.starts_with("ready"),
        "a degraded dependency keeps the agent ready: {body}"
    );
    let until = Instant::now() + Duration::from_secs(10);
    while agent.metric("podscope_cri_errors_total", &[]) <= errors0 {
        assert!(Instant::now() < until, "CRI's failures are not counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.metric_until("podscope_dependency_degraded", &["dependency=\"cri\""], 1.0);
    let doctor = agent.doctor_agent_check();
    assert!(
        doctor["detail"].as_str().unwrap().contains("cri"),
        "{doctor}"
    );
    drop(thaw);
    agent.readyz_until("CRI recovered", Duration::from_secs(30), |b| {
        b.contains("[+]cri ok")
    });
    agent.metric_until(
        "podscope_dependency_degradations_total",
        &["dependency=\"cri\""],
        1.0,
    );
    watch.check("frozen containerd");
    let took = agent.terminate();
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    let _ = std::fs::remove_dir_all(&state);
}

/// Deletes a test node pod (NAMESPACE/POD) when dropped, if it is there.
struct DeletePod(&'static str);

impl Drop for DeletePod {
    fn drop(&mut self) {
        if let Some(node) = testnode() {
            let _ = Command::new(node)
                .args(["delete", self.0, "--wait"])
                .output();
        }
    }
}

/// A small tmpfs, unmounted and removed at the end.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(bytes: usize) -> Tmpfs {
        let dir = state_dir("tmpfs");
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "podscope-faults",
            ])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "cannot mount a tmpfs");
        Tmpfs(dir)
    }

    /// Fills it to the last byte.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_full_state_directory_keeps_records_in_memory() {
    let test = "a_full_state_directory_keeps_records_in_memory";
    if !privileged(test) {
        return;
    }
    let _turn = node_turn();
    if test_node_up(test).is_none() {
        return;
    }
    let fs = Tmpfs::mount(1 << 20);
    let agent = Agent::start(&["--cri-socket", SOCKET], &[], &fs.0);
    fs.fill();
    let watch = HealthWatch::start(agent.port);
    let reader = StormReader::open(&agent.socket);
    // A pod left by an interrupted run would not exit again.
    drop(DeletePod("podscope-faults/full"));
    let _pod = DeletePod("podscope-faults/full");
    // A container that exits 3: its record cannot reach the disk.
    support::apply(
        "faults-full",
        "exited",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: full\n  namespace: podscope-faults\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    command: [\"sh\", \"-c\", \"exit 3\"]\n",
    );
    storm_is_seen(&agent, &reader, "full state directory");
    let deadline = Instant::now() + Duration::from_secs(30);
    let record = loop {
        let (_, body) = agent.api("/api/v1/terminations?namespace=podscope-faults&pod=full");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if let Some(r) = v["terminations"].as_array().and_then(|a| a.last()).cloned() {
            break r;
        }
        assert!(Instant::now() < deadline, "no record served: {body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(record["exit_code"], 3, "{record}");
    // Paged: `since` after the record leaves nothing; `limit` caps each list.
    let (_, later) = agent
        .api("/api/v1/terminations?namespace=podscope-faults&pod=full&since=2099-01-01T00:00:00Z");
    let v: serde_json::Value = serde_json::from_str(&later).unwrap();
    assert_eq!(
        v["terminations"].as_array().map(Vec::len),
        Some(0),
        "{later}"
    );
    let one: serde_json::Value =
        serde_json::from_str(&agent.api("/api/v1/terminations?limit=1").1).unwrap();
    assert_eq!(
        one["terminations"].as_array().map(Vec::len),
        Some(1),
        "{one}"
    );
    let bad = agent.api("/api/v1/terminations?since=yesterday");
    assert_eq!(bad.0, 400, "{bad:?}");
    agent.readyz_until("journal degraded", Duration::from_secs(10), |b| {
        b.contains("[-]journal degraded")
    });
    assert!(agent.metric("podscope_journal_write_errors_total", &[]) >= 1.0);
    watch.check("full state directory");
    let took = agent.terminate();
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
}
