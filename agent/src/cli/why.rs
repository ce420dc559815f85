//! `podscope why NAMESPACE/POD`: the last terminations of a pod's containers,
//! explained, and the deaths of other processes Kubernetes never saw — asked
//! of the local agent (`/api/v1/terminations` on its unix socket), which
//! keeps them across its own restarts.

use std::{process::ExitCode, sync::Arc};

use anyhow::{Context, Result};
use clap::Args;

use super::Output;
use crate::forensics::{
    record::{SenderKind, TerminationRecord},
    respawn::{Respawn, RespawnReport},
    trigger::Basis,
};

#[derive(Args, Debug)]
pub struct WhyArgs {
    /// The pod: NAMESPACE/POD (or POD in the default namespace).
    pub pod: String,
    /// Only this container.
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(flatten)]
    pub agent: super::client::AgentFlags,
    /// How many terminations per container to show, newest first.
    #[arg(long, default_value_t = 3)]
    pub last: usize,
}

#[derive(serde::Deserialize)]
struct Answer {
    terminations: Vec<TerminationRecord>,
    background_deaths: Vec<serde_json::Value>,
    /// Absent from agents before respawn counting.
    #[serde(default)]
    respawns: Vec<RespawnReport>,
}

pub fn run(args: WhyArgs) -> Result<ExitCode> {
    let (ns, pod) = match args.pod.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => (ns, pod),
        None if !args.pod.is_empty() => ("default", args.pod.as_str()),
        _ => {
            eprintln!("podscope: {:?} is not NAMESPACE/POD", args.pod);
            return Ok(ExitCode::from(2));
        }
    };
    let mut query = format!("namespace={}&pod={}", encode(ns), encode(pod));
    if let Some(c) = &args.container {
        query.push_str(&format!("&container={}", encode(c)));
    }
    let body = args.agent.get(&format!("/api/v1/terminations?{query}"))?;
    if args.output == Output::Json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    // Everything in the answer came from outside (comm, names): escaped
    // before any of it reaches the terminal.
    let mut value: serde_json::Value = serde_json::from_str(&body).with_context(|| {
        format!(
            "the agent at {} answered something unexpected",
            args.agent.agent
        )
    })?;
    super::escape::escape_json_strings(&mut value);
    let answer: Answer = serde_json::from_value(value).with_context(|| {
        format!(
            "the agent at {} answered something unexpected",
            args.agent.agent
        )
    })?;
    print!("{}", render(ns, pod, &answer, args.last));
    Ok(ExitCode::SUCCESS)
}

fn render(ns: &str, pod: &str, a: &Answer, last: usize) -> String {
    let mut out = String::new();
    if a.terminations.is_empty() && a.background_deaths.is_empty() && a.respawns.is_empty() {
        out.push_str(&format!(
            "{ns}/{pod}: no container of this pod has ended since the agent's journal began\n"
        ));
        return out;
    }
    // Containers in order of their newest termination, newest first.
    let mut names: Vec<Arc<str>> = vec![];
    for r in a.terminations.iter().rev() {
        let n = r.pod.container.clone().unwrap_or_else(|| "?".into());
        if !names.contains(&n) {
            names.push(n);
        }
    }
    for name in &names {
        let recs: Vec<&TerminationRecord> = a
            .terminations
            .iter()
            .rev()
            .filter(|r| r.pod.container.as_deref().unwrap_or("?") == &**name)
            .take(last.max(1))
            .collect();
        let Some(newest) = recs.first() else { continue };
        let init = match &newest.container_type {
            Some(t) if t.is_init() => " (init container)",
            _ => "",
        };
        out.push_str(&format!(
            "{ns}/{pod} container {name}{init}: {}\n",
            newest.reason.as_str(),
        ));
        // Why the runtime stopped it comes first: it is the question asked most.
        out.push_str(&trigger_lines(newest));
        out.push_str(&format!("  {}\n", newest.explanation));
        // Where kubectl's reason contradicts the kernel, say so up front.
        if let Some(n) = newest
            .runtime_reported
            .as_ref()
            .and_then(|x| x.note.as_ref())
        {
            out.push_str(&format!("  {n}\n"));
        }
        for (i, r) in recs.iter().enumerate() {
            out.push_str(&detail(r, i == 0));
        }
        out.push('\n');
    }
    if !a.respawns.is_empty() {
        out.push_str(
            "Commands restarted inside running containers (Kubernetes does not count these):\n",
        );
        for r in &a.respawns {
            out.push_str(&format!(
                "  container {}: {}{}\n",
                r.pod.container.as_deref().unwrap_or("?"),
                respawn_line(&r.respawn),
                if r.main_alive {
                    ", PID 1 alive"
                } else {
                    ", PID 1 ended"
                }
            ));
        }
    }
    if !a.background_deaths.is_empty() {
        out.push_str("Processes that died while their container kept running (Kubernetes does not report these):\n");
        for d in &a.background_deaths {
            let s = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
            let sender = d
                .get("sender")
                .and_then(|x| x.get("kind"))
                .and_then(|v| v.as_str())
                .map(|k| format!(", sent by {k}"))
                .unwrap_or_default();
            let how = match d.get("signal").and_then(|v| v.as_str()) {
                Some(sig) => sig.to_string(),
                None => format!(
                    "exit {}",
                    d.get("exit_code")
                        .map(|v| v.to_string())
                        .unwrap_or_default()
                ),
            };
            out.push_str(&format!(
                "  {}  container {}: {} (pid {}) {} by {how}{sender}\n",
                s("ts"),
                s("container"),
                s("comm"),
                d.get("pid").map(|v| v.to_string()).unwrap_or_default(),
                s("cause").replace('_', "-"),
            ));
        }
    }
    out
}

/// The trigger, its evidence and the preStop timeline, when the runtime stopped it.
fn trigger_lines(r: &TerminationRecord) -> String {
    let mut s = String::new();
    if let Some(t) = &r.trigger {
        let basis = match t.basis {
            Basis::Observed => "observed",
            Basis::Inferred => "inferred",
        };
        let undecided = if t.decided {
            ""
        } else {
            " (written without the deciding evidence)"
        };
        s.push_str(&format!(
            "  trigger: {} ({basis}){undecided}: {}\n",
            t.trigger.as_str(),
            t.evidence
        ));
        for f in &t.probe_failures {
            s.push_str(&format!(
                "    probe run: {} (pid {}) at {}, {:.2} s, {}\n",
                f.command,
                f.pid,
                humantime::format_rfc3339_millis(f.started_at),
                f.duration_seconds,
                f.signal
                    .clone()
                    .unwrap_or_else(|| format!("exit {}", f.exit_code.unwrap_or(0)))
            ));
        }
        for c in &t.probe_connections {
            s.push_str(&format!(
                "    probe connection: {} → {} at {}, {}{}\n",
                c.src,
                c.dst,
                humantime::format_rfc3339_millis(c.at),
                c.outcome.as_str(),
                c.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
    }
    if let Some(l) = &r.late_connections {
        let pre_stop = match &r.pre_stop {
            Some(h) if h.ran => "preStop ran".to_string(),
            Some(h) => match &h.declared {
                Some(d) => {
                    format!("preStop {d} declared, run by kubelet (not seen in the container)")
                }
                None => "preStop did not run".to_string(),
            },
            None => "preStop did not run".to_string(),
        };
        s.push_str(&format!(
            "  {} new connection{} arrived after SIGTERM, the last {:.1} s before exit; {pre_stop} (endpoint removal lagged behind termination)\n",
            l.count,
            if l.count == 1 { "" } else { "s" },
            l.last_before_exit_seconds
        ));
    }
    if let Some(h) = &r.pre_stop {
        let line = match (h.ran, &h.started_at) {
            (true, Some(at)) => format!(
                "  preStop: {} ran at {} for {:.1} s, {}{}{}\n",
                h.command.as_deref().unwrap_or("?"),
                humantime::format_rfc3339_millis(*at),
                h.duration_seconds.unwrap_or_default(),
                h.signal
                    .clone()
                    .unwrap_or_else(|| format!("exit {}", h.exit_code.unwrap_or(0))),
                if h.cut_short_by_grace {
                    ", cut short by the grace period"
                } else {
                    ""
                },
                h.gap_to_sigterm_seconds
                    .filter(|g| *g >= 0.0)
                    .map(|g| format!(", SIGTERM {g:.2} s after it ended"))
                    .unwrap_or_default()
            ),
            _ => format!(
                "  preStop: not seen in the container{}\n",
                h.declared
                    .as_ref()
                    .map(|d| format!(" (declared: {d}; httpGet and sleep hooks run in kubelet)"))
                    .unwrap_or_default()
            ),
        };
        s.push_str(&line);
    }
    s
}

/// One respawning command in a sentence.
fn respawn_line(r: &Respawn) -> String {
    format!(
        "{} restarted {} time{} by {} (pid {}{}), {} of {} exits failed, the last {} at {}",
        r.command,
        r.respawns,
        if r.respawns == 1 { "" } else { "s" },
        r.parent_comm,
        r.parent_pid,
        if r.parent_is_main { ", PID 1" } else { "" },
        r.failed_exits,
        r.exits,
        r.last_signal
            .clone()
            .unwrap_or_else(|| format!("exit {}", r.last_exit_code.unwrap_or(0))),
        humantime::format_rfc3339_millis(r.last_exit_at)
    )
}

fn detail(r: &TerminationRecord, newest: bool) -> String {
    let t = |x: std::time::SystemTime| humantime::format_rfc3339_millis(x).to_string();
    let mut s = String::new();
    let attempt = r
        .restart_attempt
        .map(|a| format!(", attempt {a}"))
        .unwrap_or_default();
    let signal = r
        .signal
        .as_ref()
        .map(|x| format!(" ({x})"))
        .unwrap_or_default();
    if newest {
        s.push_str(&format!(
            "    ended {}{attempt}: exit code {}{signal}, ran {:.1} s, PID 1 {} (pid {})\n",
            t(r.finished_at),
            r.exit_code,
            r.finished_at
                .duration_since(r.started_at)
                .unwrap_or_default()
                .as_secs_f64(),
            r.comm,
            r.pid
        ));
        if let Some(k) = &r.runtime_reported {
            s.push_str(&format!(
                "    kubernetes: {}, exit code {}{}\n",
                if k.reason.is_empty() { "-" } else { &k.reason },
                k.exit_code,
                if k.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", k.message.trim())
                }
            ));
        }
        if let Some(x) = &r.sender {
            let place = match (&x.pod, &x.container) {
                (Some(p), Some(c)) => format!(" in {p}/{c}"),
                _ => String::new(),
            };
            s.push_str(&format!(
                "    sender: {} — {} (pid {}){place}\n",
                x.kind.as_str(),
                x.comm,
                x.pid
            ));
        }
        if let Some(at) = r.stop.sigterm_at {
            let kill = match (r.stop.sigkill_at, r.stop.sigkill_sender) {
                (Some(_), Some(k)) => format!(
                    ", SIGKILL from {} {:.1} s later",
                    k.as_str(),
                    r.stop.grace_used_seconds.unwrap_or_default()
                ),
                _ => String::new(),
            };
            let handled = match r.stop.sigterm_handled {
                Some(true) => "handled",
                Some(false) => "not handled",
                None => "?",
            };
            s.push_str(&format!(
                "    stop: SIGTERM at {} from {} ({handled}){kill}\n",
                t(at),
                r.stop.sigterm_sender.map_or("?", SenderKind::as_str)
            ));
        }
        if let Some(o) = &r.oom {
            let usage = match (o.usage_bytes, o.limit_bytes) {
                (Some(u), Some(l)) => format!(
                    ", usage {} of limit {}",
                    crate::forensics::record::mib(u),
                    crate::forensics::record::mib(l)
                ),
                _ => String::new(),
            };
            s.push_str(&format!(
                "    OOM: scope {}{usage}, victim {} (pid {}){}\n",
                o.scope.as_str(),
                o.victim_comm,
                o.victim_pid,
                o.cgroup
                    .as_ref()
                    .map(|c| format!(", limit of {c}"))
                    .unwrap_or_default()
            ));
        }
        for x in &r.respawns {
            s.push_str(&format!("    respawned: {}\n", respawn_line(x)));
        }
        for d in &r.previous_deaths {
            s.push_str(&format!(
                "    before: {} (pid {}) {} {}\n",
                d.comm,
                d.pid,
                d.cause.as_str().replace('_', "-"),
                d.signal
                    .clone()
                    .unwrap_or_else(|| format!("exit {}", d.exit_code.unwrap_or(0)))
            ));
        }
    } else {
        let kubernetes = r
            .runtime_reported
            .as_ref()
            .filter(|k| k.note.is_some())
            .map(|k| format!(" (Kubernetes showed {})", k.reason))
            .unwrap_or_default();
        s.push_str(&format!(
            "    earlier: {} at {}, exit code {}{signal}: {}{kubernetes}\n",
            r.reason.as_str(),
            t(r.finished_at),
            r.exit_code,
            r.explanation
        ));
    }
    s
}

/// Percent-encodes a query value (names are DNS labels, but be safe).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
