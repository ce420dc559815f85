//! `cargo xtask bench soak [--minutes N] [--records-memory-bytes B]
//! [--shipped | --binary PODSCOPE]`: the agent (with `--shipped`, the static
//! musl binary the image ships rather than the test build; with `--binary`,
//! any other) on a full node for a
//! long time. kubelet's default maximum of 110 pods × 3 containers run on
//! the test node with churn: pods deleted and created again under new
//! names, crash-looping containers in back-off, exit storms, CPU-throttled
//! spinners and Service traffic. Debian's Prometheus scrapes the agent every
//! 5 s. Every 10 s the agent's RSS, live heap, CPU, series count, events lost, journal
//! size and Prometheus' scrape duration are sampled; the run ends with a
//! table, a CSV and a plot of RSS, heap and CPU over time
//! (`target/soak/soak.{csv,svg,png}`).
//!
//! `cargo xtask test` runs a short version of it ([`check`]): 40 pods, 80 s
//! of churn and 40 s of quiet, the agent keeping a deleted pod's series for
//! 20 s, and its termination records within 64 KiB of memory. It asserts
//! bounded growth, never a timing: no event lost, no series left of a pod
//! deleted longer ago than the retention, records held within their budget
//! and the budget reached (so the cap is exercised), and no RSS growth
//! across the run's second half (the series set is steady by then).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    daemon::BenchAgent,
    http_get, metric_sum,
    node::BenchNode,
    tracer::{proc_cpu, proc_status_kib},
};
use crate::{build_podscope, setup};

const NS: &str = "podscope-soak";
/// kubelet's default `maxPods`.
const PODS: usize = 110;
/// The test suite's soak: how much the RSS may move across the second half
/// (allocator noise; the 10-minute run grew 0.7 MiB a minute before series
/// of deleted pods expired, so a leak of that kind exceeds it in 60 s).
const CHECK_RSS_SLACK_MIB: f64 = 0.5;
/// The test suite's soak: the agent's in-memory record budget (its floor).
const CHECK_RECORDS_MEMORY: u64 = 64 << 10;
const STORMS: usize = 5;
const CRASHERS: usize = 5;
const THROTTLED: usize = 5;
/// Pods replaced under a new name every CHURN_EVERY, one slot at a time.
const CHURN_SLOTS: usize = 15;
const CHURN_EVERY: Duration = Duration::from_secs(4);
const SERVICE_IP: &str = "198.19.88.10";

/// One soak's shape.
#[derive(Clone, Copy, Debug)]
struct Plan {
    pods: usize,
    /// How long pods are replaced.
    churn: Duration,
    /// Then how long nothing changes (the series of the last replaced pods
    /// expire in it when it is longer than the retention).
    quiet: Duration,
    /// The agent's `--series-retention`; None: its default (10 minutes).
    retention: Option<Duration>,
    /// The agent's `--records-memory-bytes`; None: its default.
    records_memory: Option<u64>,
    sample_every: Duration,
}

pub fn run(args: &[String]) -> Result<ExitCode> {
    let (mut minutes, mut records_memory, mut shipped) = (30, None, false);
    let mut binary: Option<PathBuf> = None;
    match args {
        [flag] if flag == "--check" => {
            // The test suite's version alone.
            setup::run()?;
            let mut failed = false;
            for (name, verdict) in check(&build_podscope()?)? {
                failed |= verdict.is_err();
                println!("soak / {name} ... {verdict:?}");
            }
            return Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        _ => {
            let mut it = args.iter();
            while let Some(flag) = it.next() {
                if flag == "--shipped" {
                    shipped = true;
                    continue;
                }
                let value = it.next().with_context(|| format!("{flag} needs a value"));
                match flag.as_str() {
                    "--minutes" => {
                        minutes = value?
                            .parse()
                            .context("--minutes needs a whole number of minutes")?
                    }
                    "--binary" => binary = Some(PathBuf::from(value?)),
                    "--records-memory-bytes" => {
                        records_memory = Some(
                            value?
                                .parse()
                                .context("--records-memory-bytes needs a number of bytes")?,
                        )
                    }
                    _ => bail!(
                        "usage: cargo xtask bench soak [--minutes N] [--records-memory-bytes B] [--shipped | --binary PODSCOPE] | --check"
                    ),
                }
            }
        }
    }
    setup::run()?;
    setup::apt_packages(&["librsvg2-bin"])?;
    // --shipped: the static (musl) binary the image ships, whose allocator
    // is musl's, not glibc's as in the test build.
    // --binary: any podscope, e.g. a wrapper that runs it under a heap
    // profiler (the sampled RSS and CPU are then the wrapper's process's,
    // and the stop reaches the wrapper only: heaptrack runs the agent as
    // its child, which must then be ended by its PID).
    let podscope = match (binary, shipped) {
        (Some(b), _) => b,
        (None, true) => crate::dist::shipped_for_host()?,
        (None, false) => build_podscope()?,
    };
    println!("soak: running {}", podscope.display());
    let out_dir = crate::root().join("target/soak");
    std::fs::create_dir_all(&out_dir)?;
    let plan = Plan {
        pods: PODS,
        churn: Duration::from_secs(minutes * 60),
        quiet: Duration::ZERO,
        retention: None,
        records_memory,
        sample_every: Duration::from_secs(10),
    };
    let (samples, end) = Soak::with_node(plan, |soak| soak.run(&podscope))?;
    print_series_by_family(&end.metrics, end.live.len());
    let hwm = samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    report(&samples, out_dir.as_path())?;
    println!(
        "soak: peak sampled RSS {hwm:.1} MiB; table above, plot and CSV in {}",
        out_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The test suite's soak (see the module comment): each check's name and
/// verdict. An error means the soak itself could not run.
pub fn check(podscope: &Path) -> Result<Vec<(&'static str, Result<(), String>)>> {
    let plan = Plan {
        pods: 40,
        churn: Duration::from_secs(80),
        quiet: Duration::from_secs(40),
        retention: Some(Duration::from_secs(20)),
        // Small enough that the churn fills it: the check sees the cap bind.
        records_memory: Some(CHECK_RECORDS_MEMORY),
        sample_every: Duration::from_secs(5),
    };
    let (samples, end) = Soak::with_node(plan, |soak| soak.run(podscope))?;
    if let Some(last) = samples.last() {
        println!(
            "soak: RSS {:.1} MiB at the end; termination records in memory {:.0} KiB (budget {} KiB), {} dropped for it",
            last.rss_mib,
            last.store_kib,
            CHECK_RECORDS_MEMORY >> 10,
            last.evicted
        );
    }
    Ok(verdicts(&plan, &samples, &end))
}

/// Bounded growth, from the samples and the agent's last exposition.
fn verdicts(plan: &Plan, samples: &[Sample], end: &End) -> Vec<(&'static str, Result<(), String>)> {
    let lost = samples.last().map(|s| s.lost).unwrap_or(0.0);
    let stale = series_of_other_pods(&end.metrics, &end.live);
    // The check means something only if the live pods' series are read.
    let live_series = series_of_soak_pods(&end.metrics).len() - stale.len();
    let half = (plan.churn + plan.quiet) / 2;
    let second_half: Vec<f64> = samples
        .iter()
        .filter(|s| s.at >= half)
        .map(|s| s.rss_mib)
        .collect();
    let rss_growth = match (second_half.first(), second_half.last()) {
        (Some(first), Some(_)) => second_half.iter().fold(0.0, |m: f64, r| m.max(r - first)),
        _ => f64::NAN,
    };
    let store_peak = samples.iter().map(|s| s.store_kib).fold(0.0, f64::max);
    let evicted = samples.last().map(|s| s.evicted).unwrap_or(0.0);
    let budget_kib = plan.records_memory.map(|b| b as f64 / 1024.0);
    vec![
        (
            "soak_keeps_termination_records_within_their_memory_budget",
            match budget_kib {
                _ if store_peak == 0.0 => {
                    Err("the agent reported no termination records in memory".into())
                }
                Some(b) if store_peak > b => Err(format!(
                    "the store held {store_peak:.0} KiB, over its {b:.0} KiB budget"
                )),
                Some(b) if evicted == 0.0 => Err(format!(
                    "the churn never filled the {b:.0} KiB budget (peak {store_peak:.0} KiB): the cap was not exercised"
                )),
                _ => Ok(()),
            },
        ),
        (
            "soak_loses_no_event",
            if lost == 0.0 {
                Ok(())
            } else {
                Err(format!("{lost} events lost"))
            },
        ),
        (
            "soak_keeps_no_series_of_pods_gone_past_the_retention",
            if live_series == 0 {
                Err("the agent's exposition names no pod of the soak".into())
            } else if stale.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} series name pods deleted more than {:?} ago, e.g. {}",
                    stale.len(),
                    plan.retention,
                    stale[0]
                ))
            },
        ),
        (
            "soak_rss_does_not_grow_in_the_second_half",
            if rss_growth <= CHECK_RSS_SLACK_MIB {
                Ok(())
            } else {
                Err(format!(
                    "RSS grew {rss_growth:.2} MiB across the second half (samples {second_half:?})"
                ))
            },
        ),
    ]
}

/// Series lines whose `pod` label, in the soak's namespace, is not a live pod.
fn series_of_other_pods(metrics: &str, live: &[String]) -> Vec<String> {
    series_of_soak_pods(metrics)
        .into_iter()
        .filter(|l| label(l, "pod").is_some_and(|pod| !live.iter().any(|p| p == pod)))
        .map(str::to_string)
        .collect()
}

/// Series lines naming a pod of the soak's namespace.
fn series_of_soak_pods(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && label(l, "namespace") == Some(NS))
        .filter(|l| label(l, "pod").is_some_and(|pod| !pod.is_empty()))
        .collect()
}

/// A label's value in an exposition line (values here hold no quotes).
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let at = line
        .find(&format!(",{key}"))
        .map(|i| i + 1)
        .or_else(|| line.find(&format!("{{{key}")).map(|i| i + 1))?;
    let rest = &line[at + key.len()..];
    rest.split('"').next()
}

/// What the run left: the pods alive at its end and the agent's last
/// exposition.
struct End {
    live: Vec<String>,
    metrics: String,
}

struct Soak {
    plan: Plan,
    node: BenchNode,
    /// Prometheus' configuration and data.
    dir: PathBuf,
    /// Each churn slot's current pod.
    slots: Vec<Option<String>>,
    generation: u64,
}

#[derive(Clone, Debug)]
struct Sample {
    at: Duration,
    rss_mib: f64,
    /// The agent's live heap (`podscope_agent_heap_bytes`): what it holds,
    /// where the RSS adds code, mapped rings and the allocator's free pages.
    heap_mib: f64,
    cpu_pct: f64,
    series: usize,
    lost: f64,
    journal_kib: f64,
    scrape_ms: f64,
    /// The agent's in-memory termination store (its own estimate), and what
    /// it dropped to stay within its budget.
    store_kib: f64,
    evicted: f64,
    /// `podscope_agent_table_entries`: the size of each table the agent keeps.
    tables: Vec<(String, f64)>,
}

impl Soak {
    /// Runs `f` on a soak with the test node up; the node's drop deletes
    /// the pods and the Service.
    fn with_node<T>(plan: Plan, f: impl FnOnce(&mut Soak) -> Result<T>) -> Result<T> {
        let mut soak = Soak {
            plan,
            node: BenchNode::up()?,
            dir: std::env::temp_dir().join(format!("podscope-soak-{}", std::process::id())),
            slots: vec![None; CHURN_SLOTS],
            generation: 0,
        };
        std::fs::create_dir_all(&soak.dir)?;
        let result = f(&mut soak);
        let _ = std::fs::remove_dir_all(&soak.dir);
        result
    }

    fn apply(&mut self, name: &str, manifest: &str) -> Result<()> {
        self.node.apply(&format!("{NS}/{name}"), manifest)
    }

    /// Pods of the run that exist now.
    fn live(&self) -> usize {
        self.node.made(NS)
    }

    /// Their names.
    fn live_pods(&self) -> Vec<String> {
        self.node.made_in(NS)
    }

    /// The node's pods: steady ones, exit storms, crash loops, throttled
    /// spinners, a Service with its server and client, and the churn slots.
    fn fill(&mut self) -> Result<()> {
        let three = |a: &str, b: &str, c: &str| [a.to_string(), b.to_string(), c.to_string()];
        let idle = "true; exec sleep 86400";
        let mut pods: Vec<(String, String)> = vec![];
        for i in 0..STORMS {
            pods.push((
                format!("storm-{i}"),
                pod(
                    &format!("storm-{i}"),
                    "",
                    &three(
                        "while true; do for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done; sleep 1; done",
                        idle,
                        idle,
                    ),
                    "",
                ),
            ));
        }
        for i in 0..CRASHERS {
            pods.push((
                format!("crash-{i}"),
                pod(
                    &format!("crash-{i}"),
                    "",
                    &three("sleep 1; exit 1", idle, idle),
                    "",
                ),
            ));
        }
        for i in 0..THROTTLED {
            pods.push((
                format!("throttled-{i}"),
                pod(
                    &format!("throttled-{i}"),
                    "",
                    &three("exec podscope-helper spin 1", idle, idle),
                    "    resources: {limits: {cpu: 100m}}\n",
                ),
            ));
        }
        pods.push((
            "web".into(),
            pod(
                "web",
                "  labels: {app: soak-web}\n",
                &three("exec podscope-helper serve 8080", idle, idle),
                "",
            ),
        ));
        pods.push((
            "client".into(),
            pod(
                "client",
                "",
                &three(
                    &format!(
                        "while true; do podscope-helper connect {SERVICE_IP}:80 10 >/dev/null; sleep 1; done"
                    ),
                    idle,
                    idle,
                ),
                "",
            ),
        ));
        let fixed = pods.len() + CHURN_SLOTS;
        for i in 0..self.plan.pods.saturating_sub(fixed) {
            pods.push((
                format!("steady-{i}"),
                pod(&format!("steady-{i}"), "", &three(idle, idle, idle), ""),
            ));
        }
        for (name, manifest) in pods {
            self.apply(&name, &manifest)?;
        }
        for slot in 0..CHURN_SLOTS {
            self.churn(slot)?;
        }
        let service = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: soak-web, namespace: {NS}}}\nspec:\n  clusterIP: {SERVICE_IP}\n  selector: {{app: soak-web}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n"
        );
        self.node
            .apply(&format!("service/{NS}/soak-web"), &service)?;
        // The clock starts with the node full: every container but the
        // crash-looping ones running.
        self.node.wait_running(
            NS,
            "",
            (self.live() - CRASHERS) * 3,
            Duration::from_secs(600),
        )?;
        Ok(())
    }

    /// Replaces a churn slot's pod with one under a new name: new pod,
    /// container and cgroup ids, as a Deployment's rollout makes them.
    fn churn(&mut self, slot: usize) -> Result<()> {
        if let Some(old) = self.slots[slot].take() {
            // A graceful deletion, as a rollout's.
            self.node.delete(&format!("{NS}/{old}"), &[]);
        }
        self.generation += 1;
        let name = format!("churn-{slot}-{}", self.generation);
        self.slots[slot] = Some(name.clone());
        let idle = "true; exec sleep 86400";
        let m = pod(
            &name,
            "",
            &[
                "for i in 1 2 3; do /bin/true; done; exec sleep 86400".into(),
                idle.into(),
                idle.into(),
            ],
            "",
        );
        self.apply(&name, &m)
    }

    /// Fills the node, churns, then waits quietly; samples throughout.
    fn run(&mut self, podscope: &Path) -> Result<(Vec<Sample>, End)> {
        let retention = self.plan.retention.map(|r| format!("{}s", r.as_secs()));
        let mut env: Vec<(&str, String)> = retention
            .into_iter()
            .map(|r| ("PODSCOPE_SERIES_RETENTION", r))
            .collect();
        if let Some(b) = self.plan.records_memory {
            env.push(("PODSCOPE_RECORDS_MEMORY_BYTES", b.to_string()));
        }
        let agent = BenchAgent::start_with_env(podscope, "soak", &env)?;
        let port = agent.port;
        let prom = Prometheus::start(&self.dir, port)?;
        let t = Instant::now();
        self.fill()?;
        println!(
            "soak: {} pods x 3 containers running after {:.0} s; churn {:?}, then quiet {:?}",
            self.live(),
            t.elapsed().as_secs_f64(),
            self.plan.churn,
            self.plan.quiet
        );
        let start = Instant::now();
        let churn_end = start + self.plan.churn;
        let end = churn_end + self.plan.quiet;
        let mut samples = vec![];
        let mut next_sample = start + self.plan.sample_every;
        let mut next_churn = start + CHURN_EVERY;
        let mut slot = 0;
        let mut cpu_prev = (proc_cpu(agent.pid()).unwrap_or_default(), Instant::now());
        while Instant::now() < end {
            if Instant::now() >= next_churn && Instant::now() < churn_end {
                self.churn(slot % CHURN_SLOTS)?;
                slot += 1;
                next_churn += CHURN_EVERY;
            }
            if Instant::now() >= next_sample {
                let cpu = proc_cpu(agent.pid()).unwrap_or_default();
                let now = Instant::now();
                let cpu_pct = (cpu - cpu_prev.0).as_secs_f64()
                    / (now - cpu_prev.1).as_secs_f64().max(0.001)
                    * 100.0;
                cpu_prev = (cpu, now);
                let metrics = http_get(port, "/metrics").unwrap_or_default();
                samples.push(Sample {
                    at: start.elapsed(),
                    rss_mib: proc_status_kib(agent.pid(), "VmRSS:").unwrap_or(0) as f64 / 1024.0,
                    heap_mib: metric_sum(&metrics, "podscope_agent_heap_bytes") / 1048576.0,
                    cpu_pct,
                    series: metrics
                        .lines()
                        .filter(|l| !l.starts_with('#') && !l.is_empty())
                        .count(),
                    lost: metric_sum(&metrics, "podscope_events_lost_total"),
                    journal_kib: dir_size(agent.state()) as f64 / 1024.0,
                    scrape_ms: prom.scrape_seconds().unwrap_or(f64::NAN) * 1000.0,
                    store_kib: metric_sum(&metrics, "podscope_termination_store_bytes") / 1024.0,
                    evicted: metric_sum(&metrics, "podscope_termination_store_evicted_total"),
                    tables: tables(&metrics),
                });
                next_sample += self.plan.sample_every;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let end = End {
            live: self.live_pods(),
            metrics: http_get(port, "/metrics").unwrap_or_default(),
        };
        Ok((samples, end))
    }
}

/// Series per metric family at the end, and per live pod: what podscope
/// costs Prometheus (BENCHMARKS.md turns these into samples per second).
fn print_series_by_family(metrics: &str, pods: usize) {
    let mut by_family: std::collections::BTreeMap<&str, usize> = Default::default();
    for l in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = l.split(['{', ' ']).next().unwrap_or(l);
        let family = ["_bucket", "_sum", "_count", "_total", "_created"]
            .iter()
            .find_map(|sfx| name.strip_suffix(sfx))
            .unwrap_or(name);
        *by_family.entry(family).or_default() += 1;
    }
    let total: usize = by_family.values().sum();
    println!(
        "\nseries at the end, {pods} live pods: {total} in all, {:.1} per pod\n\n| family | series | per pod |\n|---|---|---|",
        total as f64 / pods.max(1) as f64
    );
    for (family, n) in by_family {
        println!("| {family} | {n} | {:.2} |", n as f64 / pods.max(1) as f64);
    }
}

fn pod(name: &str, labels: &str, commands: &[String; 3], resources: &str) -> String {
    let mut m = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n{labels}spec:\n  terminationGracePeriodSeconds: 1\n  containers:\n"
    );
    for (c, cmd) in ["app", "sidecar", "proxy"].iter().zip(commands) {
        let _ = write!(
            m,
            "  - name: {c}\n    command: [\"sh\", \"-c\", {}]\n",
            serde_json::to_string(cmd).unwrap_or_default()
        );
        if *c == "app" {
            m.push_str(resources);
        }
    }
    m
}

struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, target: u16) -> Result<Prometheus> {
        let port = free_port()?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 5s, scrape_timeout: 4s}}\nscrape_configs:\n- job_name: podscope\n  static_configs:\n  - targets: ['127.0.0.1:{target}']\n"
            ),
        )?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "cannot start prometheus (Debian's package; `cargo xtask setup` installs it)",
            )?;
        Ok(Prometheus { child, port })
    }

    /// The last scrape's duration as Prometheus measured it.
    fn scrape_seconds(&self) -> Option<f64> {
        let body = http_get(
            self.port,
            "/api/v1/query?query=scrape_duration_seconds%7Bjob%3D%22podscope%22%7D",
        )
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A table with one row a minute (and the last), the CSV of every sample,
/// and an SVG plot of RSS and CPU turned into PNG by rsvg-convert.
fn report(samples: &[Sample], out_dir: &Path) -> Result<()> {
    println!(
        "\n| minute | RSS MiB | heap MiB | CPU % of a core | series | events lost | journal KiB | records in memory KiB | evicted | scrape ms |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut csv = String::from(
        "seconds,rss_mib,heap_mib,cpu_pct,series,events_lost,journal_kib,store_kib,evicted,scrape_ms\n",
    );
    let mut last_minute = u64::MAX;
    for (i, s) in samples.iter().enumerate() {
        let _ = writeln!(
            csv,
            "{:.0},{:.2},{:.3},{:.2},{},{},{:.1},{:.1},{},{:.2}",
            s.at.as_secs_f64(),
            s.rss_mib,
            s.heap_mib,
            s.cpu_pct,
            s.series,
            s.lost,
            s.journal_kib,
            s.store_kib,
            s.evicted,
            s.scrape_ms
        );
        let minute = s.at.as_secs() / 60;
        if minute != last_minute || i + 1 == samples.len() {
            last_minute = minute;
            println!(
                "| {:.1} | {:.1} | {:.2} | {:.2} | {} | {} | {:.0} | {:.0} | {} | {:.1} |",
                s.at.as_secs_f64() / 60.0,
                s.rss_mib,
                s.heap_mib,
                s.cpu_pct,
                s.series,
                s.lost,
                s.journal_kib,
                s.store_kib,
                s.evicted,
                s.scrape_ms
            );
        }
    }
    std::fs::write(out_dir.join("soak.csv"), csv)?;
    print_tables(samples);
    let svg = plot(samples);
    let svg_path = out_dir.join("soak.svg");
    std::fs::write(&svg_path, svg)?;
    let st = Command::new("rsvg-convert")
        .arg("-o")
        .arg(out_dir.join("soak.png"))
        .arg(&svg_path)
        .status()
        .context("cannot run rsvg-convert (Debian's librsvg2-bin)")?;
    if !st.success() {
        bail!("rsvg-convert failed ({st})");
    }
    Ok(())
}

/// Each table's entries, by name, from an exposition.
fn tables(metrics: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("podscope_agent_table_entries{table=\""))
        .filter_map(|l| {
            let (name, rest) = l.split_once('"')?;
            Some((name.to_string(), rest.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The agent's tables at each quarter of the run: a table that still grows
/// in the last quarter, when every retention has passed, is where memory goes.
fn print_tables(samples: &[Sample]) {
    let Some(last) = samples.last() else { return };
    let at = |q: usize| &samples[(samples.len() - 1) * q / 4];
    println!(
        "\n| table | {} |\n|---|---|---|---|---|",
        (1..=4)
            .map(|q| format!("minute {:.0}", at(q).at.as_secs_f64() / 60.0))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for (name, _) in &last.tables {
        let value = |s: &Sample| {
            s.tables
                .iter()
                .find(|(n, _)| n == name)
                .map_or(String::from("-"), |(_, v)| format!("{v:.0}"))
        };
        println!(
            "| {name} | {} |",
            (1..=4)
                .map(|q| value(at(q)))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
}

/// RSS (MiB, left axis) and CPU (% of one core, right axis) over minutes.
fn plot(samples: &[Sample]) -> String {
    let (w, h, l, r, t, b) = (900.0, 420.0, 70.0, 830.0, 40.0, 360.0);
    let span = samples
        .last()
        .map(|s| s.at.as_secs_f64())
        .unwrap_or(1.0)
        .max(1.0);
    let rss_max = nice(samples.iter().map(|s| s.rss_mib).fold(1.0, f64::max));
    let cpu_max = nice(samples.iter().map(|s| s.cpu_pct).fold(1.0, f64::max));
    let x = |s: &Sample| l + (r - l) * s.at.as_secs_f64() / span;
    let line = |f: &dyn Fn(&Sample) -> f64, max: f64| {
        samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s), b - (b - t) * f(s) / max))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n<text x='{l}' y='22' font-size='14'>podscope agent, {PODS} pods x 3 containers with churn: RSS (blue) and live heap (green), left; CPU (red), right</text>\n"
    );
    for i in 0..=4 {
        let y = b - (b - t) * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<line x1='{l}' x2='{r}' y1='{y}' y2='{y}' stroke='#ddd'/><text x='{}' y='{}' text-anchor='end' fill='#1f4e9c'>{:.0} MiB</text><text x='{}' y='{}' fill='#b22'>{:.1}%</text>",
            l - 6.0,
            y + 4.0,
            rss_max * f64::from(i) / 4.0,
            r + 6.0,
            y + 4.0,
            cpu_max * f64::from(i) / 4.0
        );
    }
    for i in 0..=5 {
        let xx = l + (r - l) * f64::from(i) / 5.0;
        let _ = writeln!(
            svg,
            "<text x='{xx}' y='{}' text-anchor='middle'>{:.*} min</text>",
            b + 18.0,
            usize::from(span < 600.0),
            span / 60.0 * f64::from(i) / 5.0
        );
    }
    let _ = writeln!(
        svg,
        "<polyline fill='none' stroke='#1f4e9c' stroke-width='2' points='{}'/>\n<polyline fill='none' stroke='#2a8a3a' stroke-width='2' points='{}'/>\n<polyline fill='none' stroke='#b22' stroke-width='1.5' points='{}'/>\n<rect x='{l}' y='{t}' width='{}' height='{}' fill='none' stroke='black'/>\n</svg>",
        line(&|s| s.rss_mib, rss_max),
        line(&|s| s.heap_mib, rss_max),
        line(&|s| s.cpu_pct, cpu_max),
        r - l,
        b - t
    );
    svg
}

/// The next of 1, 2, 5 × 10^k at or above `v`.
fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_deleted_pods_are_found() {
        let metrics = "# TYPE x counter\n\
            podscope_process_exits_total{namespace=\"podscope-soak\",pod=\"a\",container=\"app\",outcome=\"ok\"} 3\n\
            podscope_process_exits_total{namespace=\"podscope-soak\",pod=\"gone\",container=\"app\",outcome=\"ok\"} 1\n\
            podscope_process_exits_total{namespace=\"other\",pod=\"gone\",container=\"app\",outcome=\"ok\"} 1\n\
            podscope_events_total{source=\"exits\"} 9\n";
        assert_eq!(series_of_soak_pods(metrics).len(), 2);
        let stale = series_of_other_pods(metrics, &["a".to_string()]);
        assert_eq!(stale.len(), 1);
        assert!(stale[0].contains("pod=\"gone\""));
        assert_eq!(label(&stale[0], "namespace"), Some(NS));
    }

    #[test]
    fn axes_end_at_a_round_number() {
        assert_eq!(nice(37.0), 50.0);
        assert_eq!(nice(0.42), 0.5);
        assert_eq!(nice(100.0), 100.0);
    }

    #[test]
    fn every_pod_manifest_names_three_containers() {
        let m = pod(
            "x",
            "",
            &["a".into(), "b \"q\"".into(), "c".into()],
            "    resources: {limits: {cpu: 100m}}\n",
        );
        assert_eq!(m.matches("- name: ").count(), 3);
        assert!(m.contains(r#"command: ["sh", "-c", "b \"q\""]"#));
        assert!(m.contains("limits: {cpu: 100m}"));
    }
}
