//! Shared by the kernel tests: say clearly why a test cannot run.
#![allow(dead_code)]

use podscope::kernel::privilege::Privileges;

pub mod agent;

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
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
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
