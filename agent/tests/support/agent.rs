//! A real `podscope agent` for the pod tests, and `podscope why` asked of it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{api_socket, free_port, get, get_unix};

const SOCKET: &str = "/run/podscope-node/containerd.sock";

/// A running `podscope agent` on a free loopback port, its node-wide API
/// on a socket of its own.
pub struct Agent {
    child: Child,
    pub port: u16,
    pub socket: PathBuf,
    /// The namespace `why` asks about.
    ns: &'static str,
}

impl Agent {
    pub fn start(ns: &'static str, state: &Path, env: &[(&str, &str)]) -> Agent {
        Agent::start_with(ns, state, env, &[])
    }

    /// With more agent flags (e.g. `--netns` for the packet paths).
    pub fn start_with(
        ns: &'static str,
        state: &Path,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Agent {
        let port = free_port();
        let socket = api_socket(state);
        let mut child = Command::new(env!("CARGO_BIN_EXE_podscope"))
            .args([
                "--log",
                "podscope=debug",
                "agent",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--cri-socket",
                SOCKET,
                "--state-dir",
                state.to_str().unwrap(),
            ])
            .args(args)
            .arg("--api-socket")
            .arg(&socket)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        super::wait_attached(&mut child, None);
        Agent {
            child,
            port,
            socket,
            ns,
        }
    }

    /// `podscope why NS/POD` through the CLI, as a user would.
    fn why_cli(&self, pod: &str, extra: &[&str]) -> Vec<u8> {
        let out = Command::new(env!("CARGO_BIN_EXE_podscope"))
            .args(["why", &format!("{}/{pod}", self.ns)])
            .args(extra)
            .args(["--agent", self.socket.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "why failed: {out:?}");
        out.stdout
    }

    /// `podscope why NS/POD -o json`.
    pub fn why(&self, pod: &str) -> Value {
        serde_json::from_slice(&self.why_cli(pod, &["-o", "json"])).unwrap()
    }

    /// `podscope why NS/POD` as a user reads it (the table).
    pub fn why_table(&self, pod: &str) -> String {
        String::from_utf8_lossy(&self.why_cli(pod, &[])).into_owned()
    }

    /// The newest termination record of a container, waiting for it.
    pub fn record(&self, pod: &str, container: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all = self.why(pod);
            if let Some(r) = all["terminations"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .find(|r| r["container"] == container)
            {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no termination record for {pod}/{container}: {all}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A background death of a container, waiting for it.
    pub fn death(&self, pod: &str, container: &str, cause: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let all = self.why(pod);
            if let Some(d) = all["background_deaths"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["container"] == container && d["cause"] == cause)
            {
                return d.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {cause} background death in {pod}/{container}: {all}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A GET of the node-wide API, over the agent's socket: (status, body).
    pub fn api(&self, path: &str) -> (u16, String) {
        get_unix(&self.socket, path).expect("the API socket answers")
    }

    pub fn metrics(&self) -> String {
        get(self.port, "/metrics").expect("/metrics answers").1
    }

    pub fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(self.child.wait().unwrap().code(), Some(0));
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
