//! kubelet's prober and lifecycle-hook runner (pkg/kubelet/prober,
//! pkg/kubelet/lifecycle), and its container restart back-off.
//!
//! Probes and hooks act as kubelet's do: `exec` through CRI ExecSync (so the
//! command is a process the runtime execs into the container), `httpGet` and
//! `tcpSocket` as connections from the node (the kubelet daemon runs in the
//! node's network namespace) to the pod's address. One task per probe and
//! container, like kubelet's probe workers; it publishes the probe's result
//! on a watch channel that the pod's worker reads on its tick.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
    task::JoinHandle,
};

use crate::{
    cri::Cri,
    manifest::{Container, Handler, Probe},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Liveness,
    Readiness,
    Startup,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Liveness => "liveness",
            Kind::Readiness => "readiness",
            Kind::Startup => "startup",
        }
    }

    /// kubelet's initial results: not ready until a readiness probe
    /// succeeds, alive until a liveness probe fails, unknown until a
    /// startup probe decides.
    fn initial(self) -> Outcome {
        match self {
            Kind::Liveness => Outcome::Success,
            Kind::Readiness => Outcome::Failure,
            Kind::Startup => Outcome::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Unknown,
    Success,
    Failure,
}

/// Where a probe or hook acts: the container (exec) and the pod's address.
#[derive(Clone)]
pub struct Target {
    pub container_id: String,
    /// The pod's IP; None for a hostNetwork pod (then the node's loopback).
    pub pod_ip: Option<IpAddr>,
    pub spec: Container,
    pub cri: Cri,
}

impl Target {
    fn address(&self, host: Option<&str>, port: u16) -> Result<SocketAddr, String> {
        let ip = match host {
            Some(h) => h
                .parse::<IpAddr>()
                .map_err(|_| format!("host `{h}` is not an IP address"))?,
            None => self
                .pod_ip
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        };
        Ok(SocketAddr::new(ip, port))
    }
}

/// One probe's worker: its task and its latest result.
pub struct Worker {
    handle: JoinHandle<()>,
    pub result: watch::Receiver<Outcome>,
    /// The last failure's description (for the kubelet log and status).
    pub detail: watch::Receiver<String>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Starts probing; `gate` (the startup probe's result) holds liveness and
/// readiness probes back until it is Success, as kubelet does.
pub fn spawn(
    kind: Kind,
    probe: Probe,
    target: Target,
    gate: Option<watch::Receiver<Outcome>>,
) -> Worker {
    let (tx, rx) = watch::channel(kind.initial());
    let (dtx, drx) = watch::channel(String::new());
    let handle = tokio::spawn(async move {
        let mut target = target;
        tokio::time::sleep(Duration::from_secs(probe.initial_delay().max(0) as u64)).await;
        let period = Duration::from_secs(probe.period().max(1) as u64);
        let timeout = Duration::from_secs(probe.timeout().max(1) as u64);
        let (mut ok_run, mut fail_run) = (0i64, 0i64);
        loop {
            let started = Instant::now();
            let gated = gate
                .as_ref()
                .is_some_and(|g| *g.borrow() != Outcome::Success);
            if !gated {
                match run(&probe.handler(), &mut target, timeout).await {
                    Ok(_) => {
                        ok_run += 1;
                        fail_run = 0;
                        if ok_run >= probe.success_threshold() {
                            tx.send_replace(Outcome::Success);
                            // A startup probe that succeeded is done for this container.
                            if kind == Kind::Startup {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        fail_run += 1;
                        ok_run = 0;
                        dtx.send_replace(e);
                        if fail_run >= probe.failure_threshold() {
                            tx.send_replace(Outcome::Failure);
                            // The container is about to be killed: its
                            // successor gets new workers.
                            if kind != Kind::Readiness {
                                return;
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(period.saturating_sub(started.elapsed())).await;
        }
    });
    Worker {
        handle,
        result: rx,
        detail: drx,
    }
}

/// Runs a probe's or hook's action once within `timeout`: Ok(what
/// answered) or Err(why it failed), in kubelet's terms.
/// A zero `timeout` means none (hooks), as in CRI.
pub async fn run(h: &Handler, t: &mut Target, timeout: Duration) -> Result<String, String> {
    let bound = if timeout.is_zero() {
        Duration::from_secs(3600)
    } else {
        timeout
    };
    if let Some(e) = &h.exec {
        // ExecSync's own timeout ends the command; the outer one bounds a
        // runtime that does not answer.
        return match tokio::time::timeout(
            bound + Duration::from_secs(2),
            t.cri.exec_sync(&t.container_id, e.command.clone(), timeout),
        )
        .await
        {
            Ok(Ok((0, _, _))) => Ok("exit 0".into()),
            Ok(Ok((code, out, err))) => Err(format!(
                "command {:?} exited {code}: {}",
                e.command,
                String::from_utf8_lossy(if err.is_empty() { &out } else { &err }).trim()
            )),
            Ok(Err(e)) => Err(format!("exec failed: {e}")),
            Err(_) => Err(format!("command timed out after {}s", timeout.as_secs())),
        };
    }
    if let Some(g) = &h.http_get {
        let port = t.spec.resolve_port(&g.port)?;
        let addr = t.address(g.host.as_deref(), port)?;
        let path = g.path.clone().unwrap_or_else(|| "/".into());
        let headers: String = g
            .http_headers
            .iter()
            .map(|h| format!("{}: {}\r\n", h.name, h.value))
            .collect();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\n{headers}Connection: close\r\n\r\n"
        );
        return match tokio::time::timeout(bound, http_get(addr, req)).await {
            Ok(Ok(code)) if (200..400).contains(&code) => Ok(format!("HTTP {code}")),
            Ok(Ok(code)) => Err(format!("HTTP probe to {addr}{path} answered {code}")),
            Ok(Err(e)) => Err(format!("HTTP probe to {addr}{path} failed: {e}")),
            Err(_) => Err(format!(
                "HTTP probe to {addr}{path} timed out after {}s",
                timeout.as_secs()
            )),
        };
    }
    if let Some(s) = &h.tcp_socket {
        let port = t.spec.resolve_port(&s.port)?;
        let addr = t.address(s.host.as_deref(), port)?;
        return match tokio::time::timeout(bound, TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok("connected".into()),
            Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
            Err(_) => Err(format!("dial tcp {addr}: timed out")),
        };
    }
    if let Some(s) = &h.sleep {
        tokio::time::sleep(Duration::from_secs(s.seconds.max(0) as u64)).await;
        return Ok(format!("slept {}s", s.seconds));
    }
    Err("no action".into())
}

/// One GET: the status code of the answer.
async fn http_get(addr: SocketAddr, req: String) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    // The status line is enough; read until it is complete or the peer closes.
    while !buf.contains(&b'\n') {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 4096 {
            break;
        }
    }
    parse_status_line(&buf).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the answer is not HTTP".to_string(),
        )
    })
}

fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

/// What a lifecycle hook did, for the pod status and the kubelet log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HookRun {
    /// `exec`, `httpGet` or `sleep`.
    pub action: String,
    /// The exec command, the URL or the sleep, in one line.
    pub detail: String,
    pub started_at: String,
    pub duration_ms: u64,
    /// `succeeded`, `failed: …`, or `cut short by the grace period`.
    pub outcome: String,
}

/// Runs a hook, bounded by `limit` (preStop: the grace period), and says
/// what happened. A hook that outlives `limit` is left behind, as kubelet
/// leaves it: the container's stop ends it.
pub async fn run_hook(h: &Handler, t: &mut Target, limit: Duration) -> HookRun {
    let (action, detail) = describe(h, t);
    let started_at = crate::status::now_rfc3339();
    let t0 = Instant::now();
    // kubelet runs an exec hook without a timeout (ExecSync timeout 0) in a
    // goroutine and stops waiting after `limit`: the hook keeps running until
    // the container's stop ends it. So the run is a task of its own here,
    // not cancelled when the wait gives up (cancelling the CRI call would make
    // containerd kill the hook early).
    let (h2, mut t2) = (h.clone(), t.clone());
    let task = tokio::spawn(async move { run(&h2, &mut t2, Duration::ZERO).await });
    let outcome = match tokio::time::timeout(limit, task).await {
        Ok(Ok(Ok(_))) => "succeeded".to_string(),
        Ok(Ok(Err(e))) => format!("failed: {e}"),
        Ok(Err(e)) => format!("failed: {e}"),
        Err(_) => "cut short by the grace period".to_string(),
    };
    HookRun {
        action,
        detail,
        started_at,
        duration_ms: t0.elapsed().as_millis() as u64,
        outcome,
    }
}

fn describe(h: &Handler, t: &Target) -> (String, String) {
    if let Some(e) = &h.exec {
        return ("exec".into(), e.command.join(" "));
    }
    if let Some(g) = &h.http_get {
        let port = t.spec.resolve_port(&g.port).unwrap_or(0);
        let addr = t
            .address(g.host.as_deref(), port)
            .map(|a| a.to_string())
            .unwrap_or_default();
        return (
            "httpGet".into(),
            format!("http://{addr}{}", g.path.as_deref().unwrap_or("/")),
        );
    }
    if let Some(s) = &h.sleep {
        return ("sleep".into(), format!("{}s", s.seconds));
    }
    ("none".into(), String::new())
}

/// kubelet's restart back-off (flowcontrol.Backoff with 10 s initial and
/// 5 min maximum): the first restart is immediate, each later one waits
/// twice as long as the one before, and an entry not touched for twice the
/// maximum (10 min of running) starts over.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// The current delay and when it was last raised.
    entry: Option<(Duration, Instant)>,
}

pub const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            entry: None,
        }
    }

    /// Whether a container that finished at `finished` must still wait
    /// (kubelet's IsInBackOffSince): Some(remaining) then.
    pub fn waiting(&self, finished: Instant, now: Instant) -> Option<Duration> {
        let (delay, _) = self.entry?;
        let until = finished + delay;
        (now < until).then(|| until - now)
    }

    /// Records a restart (kubelet's Next): sets the delay the next crash waits.
    pub fn next(&mut self, now: Instant) {
        let delay = match self.entry {
            Some((d, last)) if now.duration_since(last) <= 2 * self.max => (d * 2).min(self.max),
            _ => self.initial,
        };
        self.entry = Some((delay, now));
    }

    /// The delay the next crash will wait (zero before the first restart).
    pub fn current(&self) -> Duration {
        self.entry.map(|(d, _)| d).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_maximum_and_resets() {
        let t0 = Instant::now();
        let mut b = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
        // The first crash restarts at once.
        assert_eq!(b.waiting(t0, t0), None);
        let mut now = t0;
        let mut delays = vec![];
        for _ in 0..8 {
            b.next(now);
            delays.push(b.current().as_secs());
            now += b.current();
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300, 300]);
        // Within the delay after a crash: waiting.
        assert_eq!(
            b.waiting(now, now + Duration::from_secs(5)),
            Some(Duration::from_secs(295))
        );
        // After 10 min without a restart (running), it starts over.
        b.next(now + Duration::from_secs(601));
        assert_eq!(b.current().as_secs(), 10);
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"ok\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }
}
