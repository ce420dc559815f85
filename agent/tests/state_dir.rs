//! One agent per state directory, and the directory private: a second real
//! `podscope agent` on the same state directory exits at once with one
//! sentence naming the first one's PID; the first keeps running; the
//! directory is 0700 and its files 0600. Needs root.

mod support;

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use support::{free_port, get, privileged};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(state: &Path, port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_podscope"));
    c.args([
        "agent",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--no-cri",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    // A socket of its own for each: the second agent meets the state
    // directory's lock first, whatever its socket.
    c.arg("--api-socket").arg(socket(state, port));
    c
}

fn socket(state: &Path, port: u16) -> std::path::PathBuf {
    support::api_socket(state).with_extension(port.to_string())
}

#[test]
fn a_second_agent_on_the_same_state_directory_is_refused() {
    if !privileged("a_second_agent_on_the_same_state_directory_is_refused") {
        return;
    }
    let state = std::env::temp_dir().join(format!("podscope-two-agents-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let port = free_port();
    let mut first = agent(&state, port)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    support::wait_attached(&mut first, None);
    let first = Agent(first);

    let second = agent(&state, free_port()).output().unwrap();
    let msg = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains(&format!("another podscope agent (PID {})", first.0.id())),
        "the refusal names the holder: {msg}"
    );
    assert_eq!(msg.trim().lines().count(), 1, "one sentence: {msg}");
    // The first one is untouched.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(port, "/healthz").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the first agent still answers");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "the state directory is private");
    for entry in std::fs::read_dir(&state).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{} is private", p.display());
    }
    drop(first);
    let _ = std::fs::remove_dir_all(&state);
    // Left by the first agent, killed above.
    let _ = std::fs::remove_file(socket(&state, port));
}
