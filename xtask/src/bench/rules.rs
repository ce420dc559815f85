//! The cost of one read of kube-proxy's rules, in each mode, for 1,000 and
//! 5,000 Services (two endpoints each, one port, the test node's kube-proxy
//! layout: `podscope-testnode render-rules`). The rules are loaded into a
//! scratch network namespace of this benchmark's own (nothing is sent
//! there), then `podscope rules-read` (hidden; one read exactly as the
//! agent's rules task makes it) is run there several times: its wall time,
//! the parser's peak memory (podscope's own max RSS, less an empty read's)
//! and the tool's (iptables-save or nft, its child).

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

const NETNS: &str = "podscope-bench-rules";
const READS: usize = 5;

/// A scratch network namespace, removed when dropped.
struct Scratch;

impl Scratch {
    fn new() -> Result<Scratch> {
        let _ = Command::new("ip")
            .args(["netns", "del", NETNS])
            .stderr(Stdio::null())
            .status();
        crate::status(Command::new("ip").args(["netns", "add", NETNS]))?;
        Ok(Scratch)
    }

    fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", NETNS, program]);
        c
    }

    fn load(&self, program: &str, args: &[&str], text: &str) -> Result<()> {
        let mut child = self
            .exec(program)
            .args(args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{program}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Removes both modes' rules (the namespace stays).
    fn clear(&self) -> Result<()> {
        self.load("nft", &["-f", "-"], "flush ruleset\n")?;
        for t in ["nat", "filter"] {
            let _ = self.exec("iptables").args(["-t", t, "-F"]).status();
            let _ = self.exec("iptables").args(["-t", t, "-X"]).status();
        }
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", NETNS]).status();
    }
}

/// One `podscope rules-read` in the scratch namespace.
fn read_once(scratch: &Scratch, podscope: &Path) -> Result<serde_json::Value> {
    let out = scratch
        .exec(podscope.to_str().context("path")?)
        .args(["rules-read"])
        .output()?;
    if !out.status.success() {
        bail!(
            "podscope rules-read: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Median of READS reads: (seconds, podscope max RSS KiB, tool max RSS KiB, Service ports).
fn measure(scratch: &Scratch, podscope: &Path) -> Result<(f64, f64, f64, u64)> {
    let (mut secs, mut rss, mut tool, mut ports) = (vec![], vec![], vec![], 0);
    for _ in 0..READS {
        let v = read_once(scratch, podscope)?;
        secs.push(v["seconds"].as_f64().unwrap_or(0.0));
        rss.push(v["max_rss_kib"].as_f64().unwrap_or(0.0));
        tool.push(v["tool_max_rss_kib"].as_f64().unwrap_or(0.0));
        ports = v["service_ports"].as_u64().unwrap_or(0);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((med(&mut secs), med(&mut rss), med(&mut tool), ports))
}

/// `cargo xtask bench rules`: the rules-read cost alone (no test node needed;
/// `bench net` ends with it).
pub fn standalone() -> Result<std::process::ExitCode> {
    crate::setup::run()?;
    let podscope = crate::build_podscope()?;
    crate::status(crate::cargo().args(["build", "--release", "--quiet", "-p", "testnode"]))?;
    run(
        &podscope,
        &crate::root().join("target/release/podscope-testnode"),
    )?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Prints the table; `testnode` renders the rules, `podscope` reads them.
pub fn run(podscope: &Path, testnode: &Path) -> Result<()> {
    let scratch = Scratch::new()?;
    scratch.clear()?;
    let (_, empty_rss, _, _) = measure(&scratch, podscope)?;
    println!(
        "rules read: one read as the agent's rules task makes it, median of {READS}, in a scratch network namespace (2 endpoints per Service)"
    );
    println!(
        "  mode      Services  ports read  time      parser peak (above an empty read)  tool peak RSS"
    );
    for mode in ["iptables", "nftables"] {
        for services in [1000, 5000] {
            let text = Command::new(testnode)
                .args(["render-rules", "--proxy-mode", mode, "--services"])
                .arg(services.to_string())
                .output()?;
            if !text.status.success() {
                bail!("render-rules: {}", String::from_utf8_lossy(&text.stderr));
            }
            let text = String::from_utf8(text.stdout)?;
            scratch.clear()?;
            match mode {
                "iptables" => scratch.load("iptables-restore", &["-w"], &text)?,
                _ => scratch.load("nft", &["-f", "-"], &text)?,
            }
            let (secs, rss, tool, ports) = measure(&scratch, podscope)?;
            println!(
                "  {mode:<9} {services:>8}  {ports:>10}  {:>6.0} ms  {:>8.1} MiB                       {:>6.1} MiB",
                secs * 1e3,
                (rss - empty_rss).max(0.0) / 1024.0,
                tool / 1024.0
            );
        }
    }
    Ok(())
}
