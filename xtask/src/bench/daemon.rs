//! `podscope agent` as the node-scale benchmarks run it: on the test node's
//! CRI socket, watching the node's network namespace, with a state
//! directory and an API socket of its own, on a free loopback port; ready
//! when `start` returns, stopped with SIGTERM and cleaned up on drop.

use std::{
    io::Write,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::http_get;
use crate::NODE_SOCKET;

pub(crate) struct BenchAgent {
    child: Child,
    pub(crate) port: u16,
    pub(crate) socket: PathBuf,
    state: PathBuf,
}

impl BenchAgent {
    /// `name` tells this benchmark's state directory from another's.
    pub(crate) fn start(podscope: &Path, name: &str) -> Result<BenchAgent> {
        BenchAgent::start_with_env(podscope, name, &[])
    }

    /// With environment variables set for the agent (e.g. a PATH that
    /// finds a fake rules tool first).
    pub(crate) fn start_with_env(
        podscope: &Path,
        name: &str,
        env: &[(&str, String)],
    ) -> Result<BenchAgent> {
        BenchAgent::start_with(podscope, name, env, &[])
    }

    /// With more agent flags too (e.g. `--no-cri`).
    pub(crate) fn start_with(
        podscope: &Path,
        name: &str,
        env: &[(&str, String)],
        args: &[&str],
    ) -> Result<BenchAgent> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let state =
            std::env::temp_dir().join(format!("podscope-bench-{name}-{}", std::process::id()));
        let socket = api_socket(&state);
        let child = Command::new(podscope)
            .args([
                "agent",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--cri-socket",
                NODE_SOCKET,
                // The packet probes watch the node's namespace (where its
                // pods' traffic and its prober's connections are), not the
                // machine's.
                "--netns",
                "/run/netns/podscope-node",
            ])
            .arg("--state-dir")
            .arg(&state)
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let agent = BenchAgent {
            child,
            port,
            socket,
            state,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(port, "/readyz")
            .map(|b| !b.starts_with("ready"))
            .unwrap_or(true)
        {
            if Instant::now() > deadline {
                bail!("the agent did not become ready within 30 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(agent)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The state directory (the journal's size is read from it).
    pub(crate) fn state(&self) -> &Path {
        &self.state
    }

    /// A reader of `/api/v1/events` on the API socket, its request sent.
    pub(crate) fn events(&self) -> Result<UnixStream> {
        let mut s = UnixStream::connect(&self.socket)?;
        write!(s, "GET /api/v1/events HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        Ok(s)
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A benchmark agent's API socket, beside its state directory (the
/// default one is for an agent a person runs).
pub(crate) fn api_socket(state: &Path) -> PathBuf {
    PathBuf::from(format!("{}.api.sock", state.display()))
}
