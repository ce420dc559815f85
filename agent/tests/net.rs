//! Packet paths through kube-proxy's rules, on the test node: real pods on
//! its bridge, ClusterIP and NodePort Services the node writes in kube-proxy's own
//! iptables layout and then, for the same pods and Services, its nftables layout, `podscope trace net` and the agent's metrics watching
//! the node's network namespace. Needs root. Every packet stays inside the
//! node's namespace (pods 198.18.0.0/16, Services 198.19.0.0/16).

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{free_port, privileged, required, testnode};

const NS: &str = "podscope-net";
const SOCKET: &str = "/run/podscope-node/containerd.sock";
const NETNS: &str = "/run/netns/podscope-node";
const WEB_IP: &str = "198.19.77.10";
const NONE_IP: &str = "198.19.77.11";
const GUARDED_IP: &str = "198.19.77.12";
const LATE_IP: &str = "198.19.77.13";
const DRAINED_IP: &str = "198.19.77.14";
const PODS: [&str; 7] = [
    "web-a",
    "web-b",
    "guarded",
    "client",
    "hostclient",
    "late",
    "drained",
];
const SERVICES: [&str; 7] = [
    "web", "none", "guarded", "web-np", "none-np", "late", "drained",
];
/// The node's own address on the pods' bridge (their gateway): where a pod
/// reaches a NodePort of its own node.
const NODE_IP: &str = "198.18.0.1";
const WEB_NODE_PORT: u16 = 30080;
const NONE_NODE_PORT: u16 = 30081;

fn node(args: &[&str]) -> String {
    let bin = testnode().expect("podscope-testnode");
    let out = Command::new(&bin).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "podscope-testnode {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn apply(name: &str, manifest: &str, wait: bool) -> Value {
    let dir = std::env::temp_dir().join(format!("podscope-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, manifest).unwrap();
    let mut args = vec!["apply", "-f", file.to_str().unwrap(), "-o", "json"];
    if wait {
        args.extend(["--wait", "running"]);
    }
    let out = node(&args);
    let _ = std::fs::remove_file(&file);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("apply -o json printed {out:?}: {e}"))
}

fn server(name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{app: {app}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    command: [podscope-helper, serve, \"8080\"]\n"
    )
}

/// A NodePort Service (cluster IP allocated by the node).
fn node_port_service(name: &str, node_port: u16, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  type: NodePort\n  selector: {{app: {app}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: {node_port}}}\n"
    )
}

fn service(name: &str, ip: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  clusterIP: {ip}\n  selector: {{app: {app}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n"
    )
}

/// `podscope-helper connect` from the client pod: its summary line.
fn connect(addr: &str, n: u32) -> String {
    connect_from("client", addr, n)
}

fn connect_from(pod: &str, addr: &str, n: u32) -> String {
    let out = Command::new(testnode().unwrap())
        .args([
            "exec",
            &format!("{NS}/{pod}"),
            "main",
            "--",
            "podscope-helper",
            "connect",
            addr,
            &n.to_string(),
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn in_node(cmd: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", "podscope-node"])
        .args(cmd)
        .output()
        .unwrap()
}

/// A DROP in the node's FORWARD chain for traffic to one pod, as a network
/// policy would write it; removed when dropped.
struct DropRule(String);

impl DropRule {
    fn iptables(op: &str, pod_ip: &str) -> std::process::Output {
        let (comment, target) = ("podscope test: policy drop", "DROP");
        in_node(&[
            "iptables",
            "-w",
            op,
            "FORWARD",
            "-d",
            pod_ip,
            "-p",
            "tcp",
            "-m",
            "comment",
            "--comment",
            comment,
            "-j",
            target,
        ])
    }

    fn add(pod_ip: &str) -> DropRule {
        let out = DropRule::iptables("-I", pod_ip);
        assert!(out.status.success(), "{out:?}");
        DropRule(pod_ip.to_string())
    }
}

impl Drop for DropRule {
    fn drop(&mut self) {
        let _ = DropRule::iptables("-D", &self.0);
    }
}

/// A podscope process (trace or agent), killed by PID when dropped.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "net: {msg}");
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((
        head.split_whitespace().nth(1)?.parse().ok()?,
        body.to_string(),
    ))
}

/// The value of the first series of `name` whose labels include all of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn service_paths_of_real_pods_are_traced_and_counted() {
    if !privileged("service_paths_of_real_pods_are_traced_and_counted") {
        return;
    }
    if testnode().is_none() {
        assert!(
            !required(),
            "podscope-testnode is not built: `cargo build --release -p testnode`"
        );
        support::say_skipped("net", "podscope-testnode is not built");
        return;
    }
    node(&["up"]);
    let result = std::panic::catch_unwind(scenarios);
    let bin = testnode().unwrap();
    for s in SERVICES {
        let _ = Command::new(&bin)
            .args(["delete", &format!("service/{NS}/{s}")])
            .output();
    }
    for p in PODS {
        let _ = Command::new(&bin)
            .args(["delete", &format!("{NS}/{p}")])
            .output();
    }
    // The node's defaults, whatever the scenarios reached.
    let _ = Command::new(&bin).args(["proxy-mode", "iptables"]).output();
    let _ = Command::new(&bin).args(["endpoint-delay", "0s"]).output();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn scenarios() {
    let a = apply("web-a", &server("web-a", "web"), true);
    let b = apply("web-b", &server("web-b", "web"), true);
    let g = apply("guarded", &server("guarded", "guarded"), true);
    apply(
        "client",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: {NS}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    command: [sleep, \"3600\"]\n"
        ),
        true,
    );
    apply(
        "hostclient",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: hostclient, namespace: {NS}}}\nspec:\n  hostNetwork: true\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    command: [sleep, \"3600\"]\n"
        ),
        true,
    );
    apply("svc-web", &service("web", WEB_IP, "web"), false);
    apply("svc-none", &service("none", NONE_IP, "nothing"), false);
    apply(
        "svc-guarded",
        &service("guarded", GUARDED_IP, "guarded"),
        false,
    );
    let np = apply(
        "svc-web-np",
        &node_port_service("web-np", WEB_NODE_PORT, "web"),
        false,
    );
    assert_eq!(np["nodePorts"][0], WEB_NODE_PORT, "{np}");
    apply(
        "svc-none-np",
        &node_port_service("none-np", NONE_NODE_PORT, "nothing"),
        false,
    );
    let ip = |s: &Value| s["pod_ip"].as_str().unwrap().to_string();
    let (a_ip, b_ip, g_ip) = (ip(&a), ip(&b), ip(&g));

    say("the node writes kube-proxy's layout");
    let saved = String::from_utf8_lossy(&in_node(&["iptables-save"]).stdout).into_owned();
    for want in [
        format!("--comment \"{NS}/web:http cluster IP\""),
        "-m statistic --mode random --probability 0.50000000000".to_string(),
        format!("--comment \"{NS}/none:http has no endpoints\""),
        format!("-j DNAT --to-destination {a_ip}:8080"),
        "-j KUBE-MARK-MASQ".to_string(),
        format!("--comment \"{NS}/none-np:http has no endpoints\" -m addrtype --dst-type LOCAL"),
    ] {
        assert!(saved.contains(&want), "missing {want} in\n{saved}");
    }
    // iptables-save quotes comments or not depending on its backend.
    assert!(
        saved.lines().any(|l| l.starts_with("-A KUBE-NODEPORTS")
            && l.contains(&format!("{NS}/web-np:http"))
            && l.contains(&format!("--dport {WEB_NODE_PORT} -j KUBE-EXT-"))),
        "no NodePort rule in\n{saved}"
    );

    traced_and_counted("iptables", &a_ip, &b_ip, &g_ip);

    say("the older kernels' path: conntrack events instead of netfilter links");
    let (fallback, lines, ready) = start_trace(&[("PODSCOPE_NET_FALLBACK", "conntrack")]);
    ready
        .recv_timeout(Duration::from_secs(30))
        .expect("trace net attached");
    let out = connect(&format!("{WEB_IP}:80"), 4);
    assert!(out.starts_with("connected 4 "), "{out}");
    let mut seen = vec![];
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 4 && Instant::now() < deadline {
        if let Ok(v) = lines.recv_timeout(Duration::from_millis(500))
            && v["kind"] == "connection"
            && v["dst"] == format!("{WEB_IP}:80").as_str()
        {
            seen.push(v);
        }
    }
    drop(fallback);
    assert_eq!(seen.len(), 4, "{seen:?}");
    for c in &seen {
        assert_eq!(c["pod"], "client", "{c}");
        assert_eq!(c["outcome"], "forwarded", "{c}");
        assert_eq!(c["service"]["name"], "web", "{c}");
        assert!(
            c["endpoint_pod"]["pod"] == "web-a" || c["endpoint_pod"]["pod"] == "web-b",
            "{c}"
        );
    }

    say("kube-proxy's nftables mode: the same pods and Services, the same outcomes");
    // Switched back to iptables (the node's default) by the test's cleanup.
    node(&["proxy-mode", "nftables"]);
    let listed =
        String::from_utf8_lossy(&in_node(&["nft", "list", "table", "ip", "kube-proxy"]).stdout)
            .into_owned();
    for want in [
        format!("{WEB_IP} . tcp . 80 : goto service-"),
        "numgen random mod 2 vmap".to_string(),
        format!("dnat to {a_ip}:8080"),
        format!("{NONE_IP} . tcp . 80 comment \"{NS}/none:http\" : goto reject-chain"),
        format!("tcp . {NONE_NODE_PORT} comment \"{NS}/none-np:http\" : goto reject-chain"),
        format!("tcp . {WEB_NODE_PORT} : goto external-"),
    ] {
        assert!(listed.contains(&want), "missing {want} in\n{listed}");
    }
    let saved = String::from_utf8_lossy(&in_node(&["iptables-save"]).stdout).into_owned();
    assert!(
        !saved.contains("KUBE-SERVICES"),
        "iptables mode's rules are gone:\n{saved}"
    );
    traced_and_counted("nftables", &a_ip, &b_ip, &g_ip);
    dying_endpoints();
}

/// Connections that reach a dying endpoint: the node keeps a terminating
/// pod's endpoint for a propagation delay (as EndpointSlices do), so a pod
/// deleted without a preStop hook gets SIGTERM while new connections still
/// reach it (counted, shown in `trace net` and in `why`); a pod whose preStop
/// `sleep` outlasts the delay gets none. Both pods' servers are PID 1
/// without a SIGTERM handler, so they serve on until the grace period's
/// SIGKILL, as an application that drains would.
fn dying_endpoints() {
    say("connections that reach a dying endpoint");
    let dying = |name: &str, lifecycle: &str, grace: u32| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{app: {name}}}\nspec:\n  terminationGracePeriodSeconds: {grace}\n  containers:\n  - name: main\n    command: [podscope-helper, serve, \"8080\"]\n{lifecycle}"
        )
    };
    apply("late", &dying("late", "", 2), true);
    apply(
        "drained",
        &dying(
            "drained",
            "    lifecycle:\n      preStop: {sleep: {seconds: 3}}\n",
            5,
        ),
        true,
    );
    apply("svc-late", &service("late", LATE_IP, "late"), false);
    apply(
        "svc-drained",
        &service("drained", DRAINED_IP, "drained"),
        false,
    );
    node(&["endpoint-delay", "1s"]);
    let scratch = std::env::temp_dir().join(format!("podscope-net-dying-{}", std::process::id()));
    let agent =
        support::agent::Agent::start_with(NS, &scratch.join("state"), &[], &["--netns", NETNS]);
    let (trace, lines, ready) = start_trace(&[]);
    ready
        .recv_timeout(Duration::from_secs(30))
        .expect("trace net attached");
    // Clients keep connecting to both Services while both pods are deleted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = [LATE_IP, DRAINED_IP]
        .into_iter()
        .map(|ip| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rounds = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    connect(&format!("{ip}:80"), 1);
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    // Each Service serves before the deletions.
    std::thread::sleep(Duration::from_millis(500));
    let deletions: Vec<_> = ["late", "drained"]
        .into_iter()
        .map(|p| std::thread::spawn(move || node(&["delete", &format!("{NS}/{p}"), "--wait"])))
        .collect();
    for d in deletions {
        d.join().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        assert!(c.join().unwrap() > 0);
    }
    node(&["endpoint-delay", "0s"]);

    let mut conns: Vec<Value> = vec![];
    while let Ok(v) = lines.recv_timeout(Duration::from_millis(1500)) {
        if v["kind"] == "connection" && v["namespace"] == NS {
            conns.push(v);
        }
    }
    drop(trace);
    let to = |pod: &str, outcome: &str| {
        conns
            .iter()
            .filter(|c| c["endpoint_pod"]["pod"] == pod && c["outcome"] == outcome)
            .count()
    };
    assert!(
        to("late", "forwarded") > 0 && to("drained", "forwarded") > 0,
        "both Services served before the deletions: {conns:?}"
    );
    let late = to("late", "forwarded_to_terminating_endpoint");
    assert!(
        late > 0,
        "connections after SIGTERM reached the pod without preStop: {conns:?}"
    );
    assert_eq!(
        to("drained", "forwarded_to_terminating_endpoint"),
        0,
        "the preStop sleep outlasted the endpoint's removal: {conns:?}"
    );
    for c in conns
        .iter()
        .filter(|c| c["outcome"] == "forwarded_to_terminating_endpoint")
    {
        assert_eq!(c["service"]["name"], "late", "{c}");
    }

    let record = agent.record("late", "main");
    let counted = record["late_connections"]["count"].as_u64().unwrap_or(0);
    assert!(counted > 0, "{record}");
    assert!(
        agent.record("drained", "main")["late_connections"].is_null(),
        "no late connections in the drained pod's record"
    );
    let why = agent.why_table("late");
    assert!(
        why.contains(&format!("{counted} new connection"))
            && why.contains("arrived after SIGTERM")
            && why.contains("preStop did not run"),
        "{why}"
    );
    let body = agent.metrics();
    let terminating = |svc: &str| {
        metric(
            &body,
            "podscope_service_connections_to_terminating_total",
            &[("service", svc), ("namespace", NS), ("pod", svc)],
        )
    };
    assert_eq!(terminating("late"), late as f64, "{body}");
    assert_eq!(terminating("drained"), 0.0, "{body}");
    agent.stop();
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Runs the agent and `trace net` against the node in its current kube-proxy
/// mode, makes the connections every mode must name the same way (ClusterIP
/// split across endpoints, no-endpoint reject, DROP, NodePort, hostNetwork
/// client, no Service) and checks what both reported.
fn traced_and_counted(mode: &str, a_ip: &str, b_ip: &str, g_ip: &str) {
    say(&format!("{mode} mode"));
    let scratch =
        std::env::temp_dir().join(format!("podscope-net-agent-{mode}-{}", std::process::id()));
    let port = free_port();
    let _agent = Proc(
        Command::new(env!("CARGO_BIN_EXE_podscope"))
            .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--cri-socket", SOCKET, "--netns", NETNS])
            .arg("--state-dir")
            .arg(scratch.join("state"))
            .arg("--api-socket")
            .arg(scratch.join("api.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (trace, lines, ready) = start_trace(&[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(port, "/readyz").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the agent did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    ready
        .recv_timeout(Duration::from_secs(30))
        .expect("trace net attached");

    say("a pod connecting to a ClusterIP: Service and endpoint, both endpoints counted");
    let out = connect(&format!("{WEB_IP}:80"), 30);
    assert!(out.starts_with("connected 30 "), "{out}");
    say("a Service without endpoints: rejected");
    let out = connect(&format!("{NONE_IP}:80"), 2);
    assert!(out.contains("refused 2"), "{out}");
    say("a DROP on the way to the endpoint: dropped with its reason");
    let rule = DropRule::add(g_ip);
    let out = connect(&format!("{GUARDED_IP}:80"), 1);
    assert!(out.contains("timeout 1"), "{out}");
    drop(rule);
    say("a pod connecting to its node's address at a NodePort: the NodePort's Service");
    let out = connect(&format!("{NODE_IP}:{WEB_NODE_PORT}"), 6);
    assert!(out.starts_with("connected 6 "), "{out}");
    say("a NodePort Service without endpoints: rejected on the node's address");
    let out = connect(&format!("{NODE_IP}:{NONE_NODE_PORT}"), 1);
    assert!(out.contains("refused 1"), "{out}");
    say(
        "a hostNetwork pod (the node's address) connecting to a ClusterIP: named by its socket's cgroup",
    );
    let out = connect_from("hostclient", &format!("{WEB_IP}:80"), 4);
    assert!(out.starts_with("connected 4 "), "{out}");
    say("traffic that touches no Service");
    let out = connect(&format!("{a_ip}:8080"), 3);
    assert!(out.starts_with("connected 3 "), "{out}");

    // What trace net printed.
    let mut conns: Vec<Value> = vec![];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match lines.recv_timeout(Duration::from_millis(500)) {
            Ok(v) if v["kind"] == "connection" && v["namespace"] == NS => conns.push(v),
            Ok(_) => {}
            Err(_) if conns.len() >= 47 => break,
            Err(_) => {}
        }
    }
    drop(trace);
    let to = |ip: &str| -> Vec<&Value> {
        conns
            .iter()
            .filter(|c| c["dst"].as_str().is_some_and(|d| d.starts_with(ip)))
            .collect()
    };
    let (host, web): (Vec<&Value>, Vec<&Value>) = to(WEB_IP)
        .into_iter()
        .partition(|c| c["pod"] == "hostclient");
    assert_eq!(host.len(), 4, "{host:?}");
    for c in &host {
        assert!(
            c["src"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("{NODE_IP}:"))),
            "from the node's address: {c}"
        );
        assert_eq!(c["container"], "main", "{c}");
        assert_eq!(c["service"]["name"], "web", "{c}");
        assert_eq!(c["outcome"], "forwarded", "{c}");
    }
    assert_eq!(web.len(), 30, "one line per connection: {web:?}");
    for c in &web {
        assert_eq!(c["pod"], "client", "{c}");
        assert_eq!(c["outcome"], "forwarded", "{c}");
        assert_eq!(c["service"]["name"], "web", "{c}");
        assert_eq!(c["service"]["namespace"], NS, "{c}");
    }
    let to_a = web
        .iter()
        .filter(|c| c["endpoint_pod"]["pod"] == "web-a")
        .count();
    let to_b = web
        .iter()
        .filter(|c| c["endpoint_pod"]["pod"] == "web-b")
        .count();
    assert_eq!(to_a + to_b, 30, "every endpoint is a web pod: {web:?}");
    assert!(
        to_a > 0 && to_b > 0,
        "both endpoints got connections: {to_a}/{to_b}"
    );
    let none = to(NONE_IP);
    assert_eq!(none.len(), 2, "{none:?}");
    for c in none {
        assert_eq!(c["outcome"], "rejected_no_endpoints", "{c}");
        assert_eq!(c["reason"], "NETFILTER_DROP", "{c}");
        assert_eq!(c["pod"], "client", "{c}");
    }
    let guarded = to(GUARDED_IP);
    assert_eq!(
        guarded.len(),
        1,
        "a retransmitted SYN is one connection: {guarded:?}"
    );
    assert_eq!(guarded[0]["outcome"], "dropped");
    assert_eq!(guarded[0]["reason"], "NETFILTER_DROP");
    assert_eq!(guarded[0]["endpoint"], format!("{g_ip}:8080").as_str());
    let node_port = to(&format!("{NODE_IP}:{WEB_NODE_PORT}"));
    assert_eq!(node_port.len(), 6, "{node_port:?}");
    for c in &node_port {
        assert_eq!(c["pod"], "client", "{c}");
        assert_eq!(c["outcome"], "forwarded", "{c}");
        assert_eq!(c["service"]["name"], "web-np", "{c}");
        assert_eq!(c["service"]["port"], "http", "{c}");
        assert!(
            c["endpoint_pod"]["pod"] == "web-a" || c["endpoint_pod"]["pod"] == "web-b",
            "{c}"
        );
    }
    let node_port_none = to(&format!("{NODE_IP}:{NONE_NODE_PORT}"));
    assert_eq!(node_port_none.len(), 1, "{node_port_none:?}");
    assert_eq!(node_port_none[0]["service"]["name"], "none-np");
    assert_eq!(node_port_none[0]["outcome"], "rejected_no_endpoints");
    let direct = to(a_ip);
    assert_eq!(direct.len(), 3, "{direct:?}");
    assert!(direct.iter().all(|c| c["service"].is_null()), "{direct:?}");

    say("the agent's metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = get(port, "/metrics").map(|r| r.1).unwrap_or_default();
        let svc = |s, o| {
            metric(
                &body,
                "podscope_service_connections_total",
                &[
                    ("namespace", NS),
                    ("pod", "client"),
                    ("service", s),
                    ("outcome", o),
                ],
            )
        };
        if (svc("web", "forwarded") >= 30.0 && svc("guarded", "dropped") >= 1.0)
            || Instant::now() > deadline
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let svc = |s, o| {
        metric(
            &body,
            "podscope_service_connections_total",
            &[
                ("namespace", NS),
                ("pod", "client"),
                ("service_namespace", NS),
                ("service", s),
                ("outcome", o),
            ],
        )
    };
    assert_eq!(svc("web", "forwarded"), 30.0, "{body}");
    assert_eq!(svc("none", "rejected_no_endpoints"), 2.0, "{body}");
    assert_eq!(svc("guarded", "dropped"), 1.0, "{body}");
    assert_eq!(svc("web-np", "forwarded"), 6.0, "{body}");
    assert_eq!(svc("none-np", "rejected_no_endpoints"), 1.0, "{body}");
    let ep = |ip: &str| {
        metric(
            &body,
            "podscope_service_endpoint_connections_total",
            &[("service", "web"), ("endpoint", &format!("{ip}:8080"))],
        )
    };
    // The client's 30 and the hostNetwork pod's 4.
    assert_eq!(ep(a_ip) + ep(b_ip), 34.0, "{body}");
    assert_eq!(
        metric(
            &body,
            "podscope_service_connections_total",
            &[
                ("namespace", NS),
                ("pod", "hostclient"),
                ("service", "web"),
                ("outcome", "forwarded"),
            ],
        ),
        4.0,
        "{body}"
    );
    let np_ep = |ip: &str| {
        metric(
            &body,
            "podscope_service_endpoint_connections_total",
            &[("service", "web-np"), ("endpoint", &format!("{ip}:8080"))],
        )
    };
    assert_eq!(np_ep(a_ip) + np_ep(b_ip), 6.0, "{body}");
    assert!(ep(a_ip) > 0.0 && ep(b_ip) > 0.0, "{body}");
    assert!(
        metric(
            &body,
            "podscope_packet_drops_total",
            &[
                ("namespace", NS),
                ("pod", "client"),
                ("reason", "NETFILTER_DROP")
            ]
        ) >= 3.0,
        "{body}"
    );
    // The direct connections to web-a are in no Service series: the
    // endpoint split above adds up to the 34 Service connections alone.
    let _ = std::fs::remove_dir_all(&scratch);
}

type Started = (Proc, mpsc::Receiver<Value>, mpsc::Receiver<()>);

fn start_trace(env: &[(&str, &str)]) -> Started {
    let mut child = Command::new(env!("CARGO_BIN_EXE_podscope"))
        .envs(env.iter().copied())
        .args([
            "trace",
            "net",
            "-o",
            "json",
            "--cri-socket",
            SOCKET,
            "--netns",
            NETNS,
        ])
        .args(["--log", "podscope=debug"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&line).expect("one JSON object per line");
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let (ready_tx, ready_rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("attached") {
                let _ = ready_tx.send(());
            }
            let _ = writeln!(std::io::stderr(), "trace: {line}");
        }
    });
    (Proc(child), rx, ready_rx)
}
