//! `podscope rules-read` (hidden): one read of kube-proxy's rules in this
//! network namespace, exactly as the agent's rules task makes it once it
//! knows the mode, with its wall time and peak memory, as one JSON object.
//! For the rules-read benchmark (`cargo xtask bench net`).

use std::{process::ExitCode, time::Instant};

use anyhow::Result;

use crate::deps::rules::{RulesOptions, read, read_with};

fn max_rss_kib(who: i32) -> i64 {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    ru.ru_maxrss
}

pub fn run() -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let opts = RulesOptions::default();
    // Which mode (untimed): the agent asks the one that worked last first.
    let program = rt
        .block_on(read("", &opts))
        .map(|r| r.program)
        .unwrap_or(crate::deps::rules::READERS[0]);
    let t = Instant::now();
    let r = rt.block_on(read_with(program, &opts));
    let seconds = t.elapsed().as_secs_f64();
    let (ports, mode) = match &r {
        Ok(r) => (r.map.len(), r.mode.as_str()),
        Err(_) => (0, "none"),
    };
    println!(
        "{}",
        serde_json::json!({
            "program": program,
            "mode": mode,
            "service_ports": ports,
            "seconds": seconds,
            "max_rss_kib": max_rss_kib(libc::RUSAGE_SELF),
            "tool_max_rss_kib": max_rss_kib(libc::RUSAGE_CHILDREN),
            "error": r.err().map(|e| e.to_string()),
        })
    );
    Ok(ExitCode::SUCCESS)
}
