//! `podscope why NAMESPACE/POD`: the last terminations of a pod's containers,
//! explained, and the deaths of other processes Kubernetes never saw — asked
//! of the local agent (`/api/v1/terminations` on its unix socket), which
//! keeps them across its own restarts.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use super::Output;
use crate::forensics::{
    record::{SenderKind, TerminationRecord},
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
    if a.terminations.is_empty() && a.background_deaths.is_empty() {
        out.push_str(&format!(
            "{ns}/{pod}: no container of this pod has ended since the agent's journal began\n"
        ));
        return out;
    }
    // Containers in order of their newest termination, newest first.
    let mut names: Vec<String> = vec![];
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
            .filter(|r| r.pod.container.as_deref().unwrap_or("?") == name)
            .take(last.max(1))
            .collect();
        let Some(newest) = recs.first() else { continue };
        out.push_str(&format!(
            "{ns}/{pod} container {name}: {}\n",
            newest.reason.as_str(),
        ));
        // Why the runtime stopped it comes first: it is the question asked most.
        out.push_str(&trigger_lines(newest));
        out.push_str(&format!("  {}\n", newest.explanation));
        for (i, r) in recs.iter().enumerate() {
            out.push_str(&detail(r, i == 0));
        }
        out.push('\n');
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
        s.push_str(&format!(
            "    earlier: {} at {}, exit code {}{signal}: {}\n",
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
