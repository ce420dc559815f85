//! `cargo xtask bench net`: what the packet probes cost the traffic they
//! watch. Two pods on the test node, a ClusterIP Service in front of one
//! (kube-proxy's rules, DNAT at every new connection): iperf3 throughput
//! (Debian's iperf3, run inside the pods' network namespaces with nsenter)
//! and a connect/close loop (podscope-helper in the client pod), each with
//! the agent attached (netfilter links in the node's namespace, kfree_skb)
//! and without, alternating rounds, medians compared; in kube-proxy's
//! iptables and nftables modes side by side (the test node switches its
//! Services between them), then the cost of one rules read per mode
//! ([`super::rules`]).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{daemon::BenchAgent, median, proc_cpu};
use crate::{NODE_SOCKET, build_podscope, setup};

const NS: &str = "podscope-bench-net";
const CLUSTER_IP: &str = "198.19.99.10";
const ROUNDS: usize = 5;
const CONNECTIONS: u32 = 1500;
const IPERF_SECONDS: u32 = 4;

struct Node {
    bin: PathBuf,
    was_up: bool,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Node {
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin).args(args).output()?;
        if !out.status.success() {
            bail!(
                "podscope-testnode {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, name: &str, manifest: &str, wait: bool) -> Result<serde_json::Value> {
        let file = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&file, manifest)?;
        let f = file.to_string_lossy().into_owned();
        let mut args = vec!["apply", "-f", f.as_str(), "-o", "json"];
        if wait {
            args.extend(["--wait", "running"]);
        }
        Ok(serde_json::from_str(&self.run(&args)?)?)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SAFETY: a child this benchmark started, by its PID.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        let _ = self.run(&["delete", &format!("service/{NS}/bench")]);
        for p in ["bench-srv", "bench-cli"] {
            let _ = self.run(&["delete", &format!("{NS}/{p}")]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The node's default mode.
        let _ = self.run(&["proxy-mode", "iptables"]);
        if !self.was_up {
            let _ = self.run(&["down"]);
        }
    }
}

fn pod(name: &str, labels: &str, command: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {labels}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    command: {command}\n"
    )
}

/// iperf3 inside a pod's network namespace.
fn iperf(netns: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={netns}")).arg("iperf3");
    c
}

/// One iperf3 run through the ClusterIP: received bits per second.
fn throughput(client_netns: &str) -> Result<f64> {
    let out = iperf(client_netns)
        .args([
            "-c",
            CLUSTER_IP,
            "-p",
            "5201",
            "-t",
            &IPERF_SECONDS.to_string(),
            "-J",
        ])
        .output()?;
    if !out.status.success() {
        bail!("iperf3 -c: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 printed no end.sum_received.bits_per_second")
}

/// Connections per second through the ClusterIP, from inside the client pod.
fn connection_rate(node: &Node) -> Result<f64> {
    let t = Instant::now();
    let out = node.run(&[
        "exec",
        &format!("{NS}/bench-cli"),
        "main",
        "--",
        "podscope-helper",
        "connect",
        &format!("{CLUSTER_IP}:80"),
        &CONNECTIONS.to_string(),
    ])?;
    let took = t.elapsed();
    if !out.starts_with(&format!("connected {CONNECTIONS} ")) {
        bail!("not every connection succeeded: {out}");
    }
    Ok(f64::from(CONNECTIONS) / took.as_secs_f64())
}

pub fn run() -> Result<std::process::ExitCode> {
    setup::run()?;
    let podscope = build_podscope()?;
    crate::status(crate::cargo().args(["build", "--release", "--quiet", "-p", "testnode"]))?;
    let mut node = Node {
        bin: crate::root().join("target/release/podscope-testnode"),
        was_up: Path::new(NODE_SOCKET).exists(),
        dir: std::env::temp_dir().join(format!("podscope-bench-net-{}", std::process::id())),
        children: vec![],
    };
    std::fs::create_dir_all(&node.dir)?;
    node.run(&["up"])?;
    let srv = node.apply(
        "bench-srv",
        &pod(
            "bench-srv",
            "{app: bench-srv}",
            "[podscope-helper, serve, \"8080\"]",
        ),
        true,
    )?;
    let cli = node.apply(
        "bench-cli",
        &pod("bench-cli", "{}", "[sleep, \"3600\"]"),
        true,
    )?;
    node.apply(
        "svc",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bench, namespace: {NS}}}\nspec:\n  clusterIP: {CLUSTER_IP}\n  selector: {{app: bench-srv}}\n  ports:\n  - {{name: iperf, port: 5201, targetPort: 5201}}\n  - {{name: conn, port: 80, targetPort: 8080}}\n"
        ),
        false,
    )?;
    let netns = |s: &serde_json::Value| -> Result<String> {
        s["netns_path"]
            .as_str()
            .map(str::to_string)
            .context("the pod's status has no netns_path")
    };
    let (srv_ns, cli_ns) = (netns(&srv)?, netns(&cli)?);
    node.children.push(
        iperf(&srv_ns)
            .args(["-s", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start iperf3 (cargo xtask setup installs it)")?,
    );
    std::thread::sleep(Duration::from_millis(500));
    // Warm-up: ARP, conntrack, the helper's pages.
    throughput(&cli_ns)?;
    connection_rate(&node)?;

    let mut report = vec![];
    for mode in ["iptables", "nftables"] {
        node.run(&["proxy-mode", mode])?;
        // Warm-up in this mode: conntrack, the new rules.
        throughput(&cli_ns)?;
        connection_rate(&node)?;
        let (mut tp_off, mut tp_on, mut cr_off, mut cr_on) = (vec![], vec![], vec![], vec![]);
        let mut agent_cpu = Duration::ZERO;
        let mut agent_wall = Duration::ZERO;
        for round in 0..ROUNDS {
            tp_off.push(Duration::from_secs_f64(1e9 / throughput(&cli_ns)?));
            cr_off.push(Duration::from_secs_f64(1e6 / connection_rate(&node)?));
            let agent = BenchAgent::start(&podscope, "net")?;
            let (cpu0, t0) = (proc_cpu(agent.pid()).unwrap_or_default(), Instant::now());
            tp_on.push(Duration::from_secs_f64(1e9 / throughput(&cli_ns)?));
            cr_on.push(Duration::from_secs_f64(1e6 / connection_rate(&node)?));
            agent_cpu += proc_cpu(agent.pid()).unwrap_or_default() - cpu0;
            agent_wall += t0.elapsed();
            drop(agent);
            eprintln!("bench net: {mode} round {}/{ROUNDS} done", round + 1);
        }
        // Medians of the inverse (time per Gbit, per million connections), back to rates.
        let gbps = |v: &mut Vec<Duration>| 1.0 / median(v).as_secs_f64();
        let rate = |v: &mut Vec<Duration>| 1e6 / median(v).as_secs_f64();
        report.push((
            mode,
            gbps(&mut tp_off),
            gbps(&mut tp_on),
            rate(&mut cr_off),
            rate(&mut cr_on),
            agent_cpu.as_secs_f64() / agent_wall.as_secs_f64().max(1e-9) * 100.0,
        ));
    }
    println!(
        "net benchmark: two pods through ClusterIP {CLUSTER_IP} (kube-proxy's rules, DNAT), median of {ROUNDS} alternating rounds per mode, both modes in one run"
    );
    println!(
        "  mode      iperf3 ({IPERF_SECONDS} s) without / with agent      connect+close ({CONNECTIONS}) without / with agent   agent CPU"
    );
    for (mode, t_off, t_on, c_off, c_on, cpu) in report {
        println!(
            "  {mode:<9} {t_off:>6.2} / {t_on:>6.2} Gbit/s ({:+.1}%)      {c_off:>6.0} / {c_on:>6.0} per s ({:+.1}%)        {cpu:.1}% of one core",
            (t_on / t_off - 1.0) * 100.0,
            (c_on / c_off - 1.0) * 100.0
        );
    }
    super::rules::run(&podscope, &node.bin)?;
    Ok(std::process::ExitCode::SUCCESS)
}
