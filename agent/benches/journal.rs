//! The termination journal's write cost per record (one write(2) and one
//! fdatasync, as the agent does for every termination) and the cost of
//! reading it back at start-up. Run by `cargo xtask bench terminations`;
//! prints one `key=value` line per figure.

use std::time::{Duration, Instant, SystemTime};

use podscope::{
    forensics::{
        journal::{Journal, read_dir},
        record::{Reason, Sender, SenderKind, StopTimeline, TerminationRecord},
    },
    metadata::PodIdentity,
};

fn record(n: u32) -> TerminationRecord {
    TerminationRecord {
        pod: PodIdentity {
            namespace: Some("shop".into()),
            pod: Some(format!("cart-7d9f-{n}").into()),
            pod_uid: Some("0b1e5c2a-5d0e-4e8e-9a57-5f0b8c1d2e3f".into()),
            container: Some("app".into()),
            container_id: Some(format!("{n:064x}").into()),
        },
        restart_attempt: Some(3),
        started_at: SystemTime::now() - Duration::from_secs(60),
        finished_at: SystemTime::now(),
        pid: 4242,
        comm: "java".into(),
        exit_code: 137,
        signal: Some("SIGKILL".into()),
        core_dumped: false,
        reason: Reason::KilledAfterGracePeriod,
        explanation: "killed by the runtime with SIGKILL 30.0 s after SIGTERM: PID 1 (java) handled SIGTERM but had not exited".into(),
        sender: Some(Sender {
            kind: SenderKind::Runtime,
            pid: 999,
            comm: "runc".into(),
            namespace: None,
            pod: None,
            container: None,
        }),
        stop: StopTimeline {
            sigterm_at: Some(SystemTime::now()),
            sigterm_sender: Some(SenderKind::Runtime),
            sigterm_handled: Some(true),
            sigterm_discarded: Some(false),
            sigkill_at: Some(SystemTime::now()),
            sigkill_sender: Some(SenderKind::Runtime),
            grace_used_seconds: Some(30.0),
        },
        oom: None,
        previous_deaths: vec![],
        container_type: None,
        respawns: vec![],
        trigger: None,
        pre_stop: None,
        late_connections: None,
        runtime_reported: None,
    }
}

fn main() {
    // The state directory's filesystem, as the agent would use it.
    let dir = std::env::var_os("PODSCOPE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("podscope-journal-bench-{}", std::process::id()))
        });
    let _ = std::fs::remove_dir_all(&dir);
    let n = 2000u32;
    let (mut j, _, _) = Journal::open(&dir, 64 << 20).expect("journal");
    let t = Instant::now();
    for i in 0..n {
        j.append(&record(i)).expect("append");
    }
    let write = t.elapsed();
    let bytes = j.size();
    drop(j);
    let t = Instant::now();
    let back = read_dir(&dir);
    let read = t.elapsed();
    assert_eq!(back.len(), n as usize);
    let _ = std::fs::remove_dir_all(&dir);
    println!("journal_records={n}");
    println!("journal_bytes_per_record={}", bytes / u64::from(n));
    println!(
        "journal_write_us_per_record={:.1}",
        write.as_secs_f64() * 1e6 / f64::from(n)
    );
    println!(
        "journal_read_us_per_record={:.1}",
        read.as_secs_f64() * 1e6 / f64::from(n)
    );
}
