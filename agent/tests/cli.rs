//! The `podscope` binary as a person runs it: wrong flags, no root, a live
//! stream with Ctrl-C/SIGTERM, and `doctor`.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::privileged;

fn podscope() -> Command {
    Command::new(env!("CARGO_BIN_EXE_podscope"))
}

#[test]
fn a_wrong_flag_is_a_usage_error_with_status_2() {
    let out = podscope()
        .args(["trace", "exits", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--bogus"), "{err}");
    let out = podscope()
        .args(["trace", "exits", "--duration", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a duration"));
    let out = podscope().args(["trace", "nosuchfamily"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn without_root_trace_says_so_in_one_sentence_and_exits_1() {
    // Drop to nobody with no capabilities (needs root to do that).
    if !privileged("without_root_trace_says_so_in_one_sentence_and_exits_1") {
        return;
    }
    let out = support::as_nobody(&["trace", "exits"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("needs root"), "{err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one sentence, no backtrace: {err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn trace_json_streams_exits_and_sigterm_detaches_cleanly() {
    if !privileged("trace_json_streams_exits_and_sigterm_detaches_cleanly") {
        return;
    }
    let mut tracer = podscope()
        .args(["trace", "exits", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tracer.stdout.take().unwrap()).lines();
    // Keep starting marker processes until the tracer shows one: it needs a
    // moment to attach, and nothing tells us when from outside.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (found_tx, found_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in lines.by_ref() {
            let line = line.unwrap();
            let v: serde_json::Value =
                serde_json::from_str(&line).expect("every line is one JSON object");
            if v["comm"] == "sh" && v["exit_code"] == 42 {
                let _ = found_tx.send(v);
            }
        }
    });
    let mut found = None;
    while found.is_none() && Instant::now() < deadline {
        Command::new("sh").args(["-c", "exit 42"]).status().unwrap();
        found = found_rx.recv_timeout(Duration::from_millis(100)).ok();
    }
    // SIGTERM: the tracer detaches and exits 0.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = tracer.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    reader.join().unwrap();
    let v = found.expect("the marker exit was streamed");
    assert_eq!(v["kind"], "exit");
    assert_eq!(v["signal"], serde_json::Value::Null);
    assert_eq!(v["thread"], false);
    assert!(v["ts"].as_str().unwrap().ends_with('Z'));
    for key in ["pid", "tgid", "ppid", "core_dumped", "cgroup_id"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
}

#[test]
fn trace_duration_ends_the_stream_and_reports_loss_counts() {
    if !privileged("trace_duration_ends_the_stream_and_reports_loss_counts") {
        return;
    }
    let out = podscope()
        .args(["trace", "exits", "--duration", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("TIME"), "table header first: {stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lost (ring buffer full)"), "{stderr}");
}

/// A view attaches what its events need: `trace exits` runs no signal or
/// OOM program (the kernel summary names the families that ran), `trace
/// signals` runs the signal program.
#[test]
fn trace_attaches_only_the_families_its_view_needs() {
    if !privileged("trace_attaches_only_the_families_its_view_needs") {
        return;
    }
    let summary = |view: &str| {
        let out = podscope()
            .args(["trace", view, "--duration", "1s"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        stderr
            .lines()
            .find(|l| l.contains("kernel: "))
            .and_then(|l| l.split("kernel: ").nth(1))
            // The families' counts, before the note on what "filtered" means.
            .map(|l| l.split(" (filtered:").next().unwrap_or(l).to_string())
            .unwrap_or_else(|| panic!("no kernel summary: {stderr}"))
    };
    let exits = summary("exits");
    assert!(
        exits.contains("exits ") && exits.contains("cgroups "),
        "{exits}"
    );
    assert!(
        !exits.contains("signals ") && !exits.contains("oom "),
        "trace exits ran the signal or OOM program: {exits}"
    );
    let signals = summary("signals");
    assert!(signals.contains("signals "), "{signals}");
    assert!(!signals.contains("oom "), "{signals}");
}

#[test]
fn doctor_tests_every_hook_type() {
    if !privileged("doctor_tests_every_hook_type") {
        return;
    }
    let out = podscope().args(["doctor", "-o", "json"]).output().unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("doctor -o json is one JSON object");
    let checks = v["checks"].as_array().unwrap();
    let status = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check"))["status"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for name in [
        "tracepoint",
        "raw_tp",
        "tp_btf",
        "fentry",
        "kprobe",
        "lsm",
        "netfilter_link",
        "ring_buffer",
        "btf",
        "cgroups",
        "privileges",
    ] {
        let s = status(name);
        assert!(
            ["ok", "fallback", "missing"].contains(&s.as_str()),
            "{name}: {s}"
        );
    }
    // What docs/architecture.md records of the machines this project tests on.
    assert_eq!(status("btf"), "ok");
    assert_eq!(status("ring_buffer"), "ok");
    assert_eq!(status("tp_btf"), "ok");
    assert_eq!(status("exits"), "ok");
    assert_eq!(out.status.code(), Some(0));
    // Every check says what it means for podscope.
    assert!(
        checks
            .iter()
            .all(|c| !c["meaning"].as_str().unwrap().is_empty())
    );
}

#[test]
fn why_without_an_agent_says_where_it_looked() {
    // A port nothing listens on: bind one, then let it go.
    let port = support::free_port();
    let out = podscope()
        .args(["why", "shop/cart", "--agent", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the podscope agent") && err.contains(&port.to_string()),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    // A socket path nothing is at (the default one, without an agent on
    // this machine, reads the same).
    let missing =
        std::env::temp_dir().join(format!("podscope-no-agent-{}.sock", std::process::id()));
    let out = podscope()
        .args(["why", "shop/cart", "--agent"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the podscope agent")
            && err.contains(missing.to_str().unwrap())
            && err.contains("is `podscope agent` running on this node?"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    for bad in ["shop/", "/cart", "a/b/c"] {
        let out = podscope().args(["why", bad]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("NAMESPACE/POD"));
    }
}

/// Without iptables-save (a distroless image, a minimal host) doctor says so
/// in one sentence, and still exits by the essential checks only: the net
/// family keeps reporting drops without kube-proxy's rules.
#[test]
fn doctor_says_when_iptables_save_is_missing() {
    let empty = std::env::temp_dir().join(format!("podscope-no-iptables-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = podscope()
        .args(["doctor", "-o", "json"])
        .env("PATH", &empty)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&empty);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("doctor -o json is one JSON object");
    let check = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "kube_proxy_rules")
        .expect("a kube_proxy_rules check")
        .clone();
    assert_eq!(check["status"], "missing", "{check}");
    assert_eq!(
        check["detail"], "neither iptables-save nor nft found on PATH",
        "{check}"
    );
    let meaning = check["meaning"].as_str().unwrap();
    assert!(
        meaning.contains("neither iptables-save nor nft is installed")
            && meaning.contains("drops are still reported"),
        "{meaning}"
    );
}

/// The configuration's layers, as a user sets them: file < environment <
/// flag. Each layer names an invalid address, so the one sentence the
/// agent refuses to start with says which layer won (no root needed).
#[test]
fn the_environment_beats_the_file_and_a_flag_beats_both() {
    let dir = std::env::temp_dir().join(format!("podscope-layers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("agent.toml");
    std::fs::write(&file, "listen = \"bogus-file\"\n").unwrap();
    let refused = |env: Option<&str>, flag: Option<&str>| {
        let mut cmd = podscope();
        cmd.arg("agent").env("PODSCOPE_CONFIG", &file);
        cmd.env_remove("PODSCOPE_LISTEN");
        if let Some(e) = env {
            cmd.env("PODSCOPE_LISTEN", e);
        }
        if let Some(f) = flag {
            cmd.args(["--listen", f]);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let layer = |err: String| {
        ["bogus-file", "bogus-env", "bogus-flag"]
            .into_iter()
            .find(|w| err.contains(&format!("\"{w}\" is not an address:port")))
            .unwrap_or_else(|| panic!("no layer named in {err:?}"))
    };
    assert_eq!(layer(refused(None, None)), "bogus-file");
    assert_eq!(layer(refused(Some("bogus-env"), None)), "bogus-env");
    assert_eq!(
        layer(refused(Some("bogus-env"), Some("bogus-flag"))),
        "bogus-flag"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A network namespace of the test's own (no traffic: rules only), removed
/// on drop with whatever tables it holds.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let name = format!("{name}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }

    fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// kube-proxy's iptables-wrapper picks nf_tables or legacy per node, and
/// each `*-save` shows only its own backend: the rules are found whichever
/// holds them (`iptables-save`, else `iptables-nft-save`, else
/// `iptables-legacy-save`), as `doctor` reports in the rules' namespace.
#[test]
fn kube_proxys_rules_are_read_from_either_iptables_backend() {
    if !privileged("kube_proxys_rules_are_read_from_either_iptables_backend") {
        return;
    }
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kube-proxy-iptables-save.txt"
    );
    let bin_of = |name: &str| {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .unwrap();
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            !path.is_empty(),
            "{name} is not installed (Debian's iptables package; `cargo xtask setup`)"
        );
        path
    };
    let rules_check = |ns: &Netns, path: Option<&std::path::Path>| {
        let mut cmd = ns.exec(env!("CARGO_BIN_EXE_podscope"));
        cmd.args(["doctor", "-o", "json"]);
        if let Some(dir) = path {
            let mut p = std::ffi::OsString::from(dir);
            p.push(":");
            p.push(std::env::var_os("PATH").unwrap_or_default());
            cmd.env("PATH", p);
        }
        let out = cmd.output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor -o json: {e}: {out:?}"));
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "kube_proxy_rules")
            .expect("a kube_proxy_rules check")
            .clone()
    };
    let restore = |ns: &Netns, program: &str| {
        let st = ns
            .exec(&bin_of(program))
            .stdin(std::fs::File::open(rules).unwrap())
            .status()
            .unwrap();
        assert!(st.success(), "{program} < {rules}");
    };

    // Legacy tables, while the default iptables-save (nf_tables on Debian)
    // shows none of kube-proxy's chains.
    let ns = Netns::new("podscope-legacy");
    restore(&ns, "iptables-legacy-restore");
    let c = rules_check(&ns, None);
    assert_eq!(c["status"], "ok", "{c}");
    assert_eq!(
        c["detail"], "iptables-legacy-save shows 2 Service ports",
        "{c}"
    );
    drop(ns);

    // nf_tables, on a node whose default `iptables-save` is the legacy one.
    let ns = Netns::new("podscope-nft");
    restore(&ns, "iptables-nft-restore");
    let dir = std::env::temp_dir().join(format!("podscope-legacy-default-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("iptables-save");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(bin_of("iptables-legacy-save"), &link).unwrap();
    let c = rules_check(&ns, Some(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(c["status"], "ok", "{c}");
    assert_eq!(
        c["detail"], "iptables-nft-save shows 2 Service ports",
        "{c}"
    );
}

/// doctor's checks by name, run in a network namespace.
fn doctor_checks_in(ns: &Netns) -> Vec<serde_json::Value> {
    let out = ns
        .exec(env!("CARGO_BIN_EXE_podscope"))
        .args(["doctor", "-o", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor -o json: {e}: {out:?}"));
    v["checks"].as_array().unwrap().clone()
}

fn named<'a>(checks: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("a {name} check in {checks:?}"))
}

/// kube-proxy's mode per node, as doctor names it: nftables (kube-proxy's
/// own expected rules loaded into the kernel with `nft -f`), IPVS (its
/// `kube-ipvs0` interface) and none, each with what it means.
#[test]
fn doctor_names_kube_proxys_mode() {
    if !privileged("doctor_names_kube_proxys_mode") {
        return;
    }
    let rules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kube-proxy-upstream-nftables.nft"
    );
    let ns = Netns::new("podscope-nftmode");
    let st = ns.exec("nft").args(["-f", rules]).status().unwrap();
    assert!(
        st.success(),
        "nft -f {rules} (Debian's nftables package; `cargo xtask setup`)"
    );
    let checks = doctor_checks_in(&ns);
    let mode = named(&checks, "kube_proxy_mode");
    assert_eq!(
        (&mode["status"], &mode["detail"]),
        (&"ok".into(), &"nftables".into()),
        "{mode}"
    );
    let rules_check = named(&checks, "kube_proxy_rules");
    assert_eq!(rules_check["status"], "ok", "{rules_check}");
    // Six ClusterIPs, two external and two load-balancer IPs, three NodePorts.
    assert_eq!(
        rules_check["detail"], "nft shows 13 Service ports",
        "{rules_check}"
    );
    drop(ns);

    let ns = Netns::new("podscope-ipvs");
    let st = ns
        .exec("ip")
        // kube-proxy makes it a dummy device; this kernel has no dummy
        // module, and only the name is what podscope looks for.
        .args(["link", "add", "kube-ipvs0", "type", "bridge"])
        .status()
        .unwrap();
    assert!(st.success(), "ip link add kube-ipvs0");
    let checks = doctor_checks_in(&ns);
    let mode = named(&checks, "kube_proxy_mode");
    assert_eq!(
        (&mode["status"], &mode["detail"]),
        (&"missing".into(), &"ipvs".into()),
        "{mode}"
    );
    let meaning = mode["meaning"].as_str().unwrap();
    assert!(
        meaning.contains("IPVS") && meaning.contains("not which Service"),
        "{meaning}"
    );
    drop(ns);

    let ns = Netns::new("podscope-noproxy");
    let checks = doctor_checks_in(&ns);
    let mode = named(&checks, "kube_proxy_mode");
    assert_eq!(mode["detail"], "none", "{mode}");
    assert_eq!(named(&checks, "kube_proxy_rules")["status"], "missing");
}

/// A real process that names itself with terminal escape sequences
/// (prctl(PR_SET_NAME), as any process may) and a newline, then exits 42.
fn hostile_exit(name: &std::ffi::CStr) {
    // After fork only raw syscalls (prctl, _exit): this process has threads.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        unsafe {
            libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
            libc::_exit(42);
        }
    }
    let mut status = 0;
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// Runs `podscope trace exits ARGS`, starting hostile processes until
/// `seen` accepts a line of its output; returns that line and the whole output.
fn trace_hostile(args: &[&str], seen: impl Fn(&str) -> bool + Send + 'static) -> (String, Vec<u8>) {
    use std::io::Read;
    let mut tracer = podscope()
        .args(["trace", "exits"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = tracer.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = vec![];
        let mut buf = [0u8; 4096];
        let mut sent = false;
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if !sent && let Some(line) = String::from_utf8_lossy(&all).lines().find(|l| seen(l)) {
                let _ = tx.send(line.to_string());
                sent = true;
            }
        }
        all
    });
    let name = c"\x1b[2J\x1b]0;X\x07\nok";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut found = None;
    while found.is_none() && Instant::now() < deadline {
        hostile_exit(name);
        found = rx.recv_timeout(Duration::from_millis(100)).ok();
    }
    unsafe { libc::kill(tracer.id() as i32, libc::SIGTERM) };
    let _ = tracer.wait();
    let all = reader.join().unwrap();
    (
        found.unwrap_or_else(|| {
            panic!(
                "no line of the hostile process: {}",
                String::from_utf8_lossy(&all)
            )
        }),
        all,
    )
}

/// A process named with escape sequences cannot rewrite the operator's
/// terminal through `trace exits`: the table shows the name escaped, on
/// its own line, and no raw control byte is printed; JSON keeps the exact name.
#[test]
fn escape_sequences_in_process_names_are_escaped_in_tables_and_exact_in_json() {
    if !privileged("escape_sequences_in_process_names_are_escaped_in_tables_and_exact_in_json") {
        return;
    }
    let escaped = r"\x1b[2J\x1b]0;X\x07\x0aok";
    let (line, all) = trace_hostile(&[], move |l| l.contains(escaped) && l.contains("exit 42"));
    assert!(
        !all.iter().any(|&b| b < 0x20 && b != b'\n'),
        "no control byte but the line ends reaches the terminal: {line}"
    );
    assert!(!line.contains('\u{1b}'));
    let (line, _) = trace_hostile(&["-o", "json"], |l| {
        l.contains("\"exit_code\":42") && l.contains("\\u001b[2J")
    });
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["comm"], "\u{1b}[2J\u{1b}]0;X\u{7}\nok", "JSON is exact");
}

/// `--btf PATH` for kernels without /sys/kernel/btf/vmlinux: the recorded
/// BTF of Debian's 6.1 kernel, given as a file, is what `doctor` reads; a
/// missing file says which flag to use.
#[test]
fn btf_comes_from_the_file_given_with_btf() {
    use std::io::Read;
    let dir = std::env::temp_dir().join(format!("podscope-btf-flag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vmlinux-6.1.btf");
    let mut raw = vec![];
    flate2::read::GzDecoder::new(
        std::fs::File::open(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/btf-6.1.0-47-cloud-amd64.gz"
        ))
        .unwrap(),
    )
    .read_to_end(&mut raw)
    .unwrap();
    std::fs::write(&path, &raw).unwrap();
    let btf_check = |btf: &std::path::Path| {
        let out = podscope()
            .arg("--btf")
            .arg(btf)
            .args(["doctor", "-o", "json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "btf")
            .cloned()
            .unwrap()
    };
    let c = btf_check(&path);
    assert_eq!(c["status"], "ok", "{c}");
    let detail = c["detail"].as_str().unwrap();
    assert!(
        detail.contains(path.to_str().unwrap()) && detail.contains("types"),
        "{detail}"
    );
    let c = btf_check(&dir.join("absent"));
    assert_ne!(c["status"], "ok");
    assert!(c["detail"].as_str().unwrap().contains("--btf"), "{c}");
    std::fs::remove_dir_all(&dir).unwrap();
}
