//! Shared by the kernel tests: say clearly why a test cannot run.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Output},
    time::Duration,
};

use podscope::kernel::privilege::Privileges;

pub mod agent;
pub mod certs;

/// Set by `cargo xtask test` when running as root: a kernel test that cannot
/// run is then a failure, not a skip.
pub fn required() -> bool {
    std::env::var("PODSCOPE_REQUIRE_KERNEL_TESTS").is_ok_and(|v| v == "1")
}

/// Returns false (after saying so) when this test cannot load eBPF programs.
pub fn privileged(test: &str) -> bool {
    if Privileges::current().can_trace() {
        return true;
    }
    assert!(
        !required(),
        "{test}: needs root to load eBPF programs, and PODSCOPE_REQUIRE_KERNEL_TESTS=1"
    );
    say_skipped(
        test,
        "needs root (or CAP_BPF+CAP_PERFMON) to load eBPF programs",
    );
    false
}

/// Written to stderr directly: libtest captures eprintln!, and a skip must be visible.
pub fn say_skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The test node's binary (testnode/): `$PODSCOPE_TESTNODE`, or the release
/// build of this workspace.
pub fn testnode() -> Option<std::path::PathBuf> {
    let bin = std::env::var_os("PODSCOPE_TESTNODE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/podscope-testnode"
            ))
        });
    bin.exists().then_some(bin)
}

/// A free TCP port on loopback (for an agent's --listen).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    exchange(s, path)
}

/// A plain HTTP/1.0 GET over the agent's unix socket: (status, body).
pub fn get_unix(socket: &std::path::Path, path: &str) -> Option<(u16, String)> {
    let s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    exchange(s, path)
}

/// Sends a GET of `path` and reads the answer to the end: (status, body).
fn exchange(mut s: impl std::io::Read + std::io::Write, path: &str) -> Option<(u16, String)> {
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Where a test agent with state directory `state` serves its node-wide
/// API: a socket of its own beside the state directory (the default one,
/// /run/podscope/api.sock, is for tests/api.rs's no-flags test only; two
/// agents cannot share a socket).
pub fn api_socket(state: &std::path::Path) -> std::path::PathBuf {
    let s = state.to_str().unwrap().trim_end_matches('/');
    std::path::PathBuf::from(format!("{s}.api.sock"))
}

/// Waits until a starting `podscope agent` logs that it attached (its
/// probes are in and it serves); its stderr goes on being read, each line
/// echoed with `echo` before it when given. Fails the test if the agent
/// ends or takes a minute.
pub fn wait_attached(child: &mut Child, echo: Option<&'static str>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("the agent's stderr is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(prefix) = echo {
                let _ = writeln!(std::io::stderr(), "{prefix}{line}");
            }
            if line.contains("attached") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        let st = child.try_wait();
        let _ = child.kill();
        let _ = child.wait();
        panic!("the agent did not attach within 60 s ({st:?})");
    }
}

/// `podscope ARGS` as nobody, without capabilities (needs root to drop to it).
pub fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_podscope"))
        .args(args)
        .env_remove("PODSCOPE_AGENT")
        .output()
        .expect("setpriv (util-linux) is needed for this test")
}

/// Runs `podscope-testnode ARGS`, failing the test with its output if it fails.
pub fn node(args: &[&str]) -> String {
    let bin = testnode().expect("podscope-testnode");
    let out = std::process::Command::new(&bin)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podscope-testnode {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Applies a manifest (waiting as `wait` says) and returns the pod's status
/// (the test node's JSON).
pub fn apply(name: &str, wait: &str, manifest: &str) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!("podscope-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, manifest).unwrap();
    let out = node(&[
        "apply",
        "-f",
        file.to_str().unwrap(),
        "--wait",
        wait,
        "-o",
        "json",
    ]);
    let _ = std::fs::remove_file(&file);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("apply -o json printed {out:?}: {e}"))
}

/// Polls `cond` until it holds; fails the test with `what` after `secs`
/// seconds (an outer limit only a hang would reach).
pub fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {secs} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether process `pid` has set SIGTERM's disposition: caught by a handler
/// (`SigCgt`) or ignored (`SigIgn`) in /proc/PID/status. A container's main
/// process does this after it starts; a stop sent earlier would meet the
/// default disposition instead.
pub fn sigterm_disposition_set(pid: i64, handled: bool) -> bool {
    let field = if handled { "SigCgt:" } else { "SigIgn:" };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix(field))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        // Signal N is bit N-1; SIGTERM is 15.
        .is_some_and(|mask| mask & (1 << 14) != 0)
}
