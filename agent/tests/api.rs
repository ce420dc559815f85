//! Private by default: the node-wide API (`/api/v1/events`,
//! `/api/v1/terminations`) is on the agent's unix socket, not on its TCP
//! listener. A real `podscope agent` with default settings is asked from
//! another address (a network namespace of the test's own, over a veth
//! pair): `/metrics` answers, the API does not. `podscope why` and
//! `doctor` reach the agent over the default socket with no flags; the
//! socket is 0600 in a 0700 directory, root's, and nobody else gets in. A
//! stale socket is replaced, a live one names its holder. On TCP the API is
//! served only with `--api-listen`, over TLS, with a bearer token or a
//! client certificate, and refused without. Needs root (the agent loads its
//! probes), but for the refusals of the configuration.

mod support;

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    api_socket, as_nobody,
    certs::{curl, issue, new_ca},
    free_port, get, get_unix, privileged, required, testnode,
};

const DEFAULT_SOCKET: &str = "/run/podscope/api.sock";
const CRI_SOCKET: &str = "/run/podscope-node/containerd.sock";
const NS: &str = "podscope-api";

fn podscope() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_podscope"));
    // Nothing from the caller's environment changes what is tested here.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PODSCOPE_") {
            c.env_remove(k);
        }
    }
    c
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("podscope-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running agent, killed on drop (SIGTERM with [`Agent::stop`]).
struct Agent {
    child: Option<Child>,
}

impl Agent {
    /// `podscope agent ARGS`, once it attached.
    fn start(args: &[&str]) -> Agent {
        let mut child = podscope()
            .arg("agent")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        support::wait_attached(&mut child, Some("agent: "));
        Agent { child: Some(child) }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM; asserts a clean exit.
    fn stop(mut self) {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on the PID of the child this test started.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let st = c.wait().unwrap();
        assert!(st.success(), "the agent exits 0 on SIGTERM: {st}");
    }

    /// SIGKILL: it leaves its socket behind, as a crash would.
    fn kill9(mut self) {
        let mut c = self.child.take().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

fn owner(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().uid()
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

// ---------------------------------------------------------------------------
// No root needed

/// `--api-listen` without an authentication method does not start, with
/// one sentence; nor with a token over plain HTTP.
#[test]
fn api_listen_without_authentication_is_refused() {
    let dir = scratch("refused");
    let sock = dir.join("api.sock");
    let port = free_port();
    let refused = |extra: &[&str]| {
        let out = podscope()
            .args(["agent", "--no-cri", "--state-dir"])
            .arg(dir.join("state"))
            .arg("--api-socket")
            .arg(&sock)
            .args(["--api-listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
        err
    };
    let err = refused(&[]);
    assert!(
        err.contains("needs authentication")
            && err.contains("--api-token-file")
            && err.contains("--api-client-ca"),
        "{err}"
    );
    let token = dir.join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let err = refused(&["--api-token-file", token.to_str().unwrap()]);
    assert!(err.contains("never taken over plain HTTP"), "{err}");
    // Nothing was opened meanwhile.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// Another address: a network namespace of the test's own

/// A network namespace joined to this one by a veth pair: this side
/// `HOST_IP`, the other `PEER_IP` (a benchmarking range, never routed).
struct Peer {
    ns: String,
    host_if: String,
}

const HOST_IP: &str = "198.18.253.1";
const PEER_IP: &str = "198.18.253.2";

impl Peer {
    fn new() -> Peer {
        let id = std::process::id();
        let p = Peer {
            ns: format!("podscope-api-{id}"),
            host_if: format!("psa{id}h"),
        };
        let peer_if = format!("psa{id}n");
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
        };
        ip(&["netns", "add", &p.ns]);
        ip(&[
            "link", "add", &p.host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        ip(&["link", "set", &peer_if, "netns", &p.ns]);
        ip(&["addr", "add", &format!("{HOST_IP}/30"), "dev", &p.host_if]);
        ip(&["link", "set", &p.host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &p.ns, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&["addr", "add", &format!("{PEER_IP}/30"), "dev", &peer_if]);
        in_ns(&["link", "set", &peer_if, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        p
    }

    /// A GET from inside the namespace: (status, body, the client's
    /// address). A body still streaming after 3 s is returned as it is.
    fn get(&self, addr: SocketAddr, path: &str) -> (u16, String, SocketAddr) {
        let ns = format!("/run/netns/{}", self.ns);
        let path = path.to_string();
        std::thread::spawn(move || {
            // setns(2) moves this thread only.
            let f = File::open(&ns).unwrap();
            // SAFETY: a valid namespace fd, for this thread.
            let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("{addr} from the namespace: {e}"));
            let local = s.local_addr().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
            let mut raw = vec![];
            let _ = s.read_to_end(&mut raw);
            let raw = String::from_utf8_lossy(&raw).into_owned();
            let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (status, body.to_string(), local)
        })
        .join()
        .unwrap()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// With default settings (`--listen 0.0.0.0`, as by default, on a port of
/// the test's; no `--api-listen`), another address reaches `/metrics` and
/// nothing node-wide; the agent's socket has it all.
#[test]
fn another_address_gets_metrics_and_no_node_wide_data() {
    let test = "another_address_gets_metrics_and_no_node_wide_data";
    if !privileged(test) {
        return;
    }
    let dir = scratch("remote");
    let state = dir.join("state");
    let sock = api_socket(&state);
    let port = free_port();
    let peer = Peer::new();
    let agent = Agent::start(&[
        "--no-cri",
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--state-dir",
        state.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    let addr: SocketAddr = format!("{HOST_IP}:{port}").parse().unwrap();
    let (status, body, from) = peer.get(addr, "/metrics");
    assert_eq!(
        from.ip().to_string(),
        PEER_IP,
        "asked from the other address"
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("podscope_build_info"), "{body}");
    // Events happen meanwhile: a stream, if served, would carry them.
    for path in [
        "/api/v1/events",
        "/api/v1/events?namespace=kube-system",
        "/api/v1/terminations",
        "/api/v1/terminations?limit=1000",
        "/api/v1/events/",
        "/api/v2/events",
    ] {
        let _ = Command::new("true").status();
        let (status, body, _) = peer.get(addr, path);
        assert_eq!(status, 404, "{path}: {body}");
        assert!(
            !body.contains("\"kind\"") && !body.contains("\"terminations\""),
            "{path} gave node-wide data to {PEER_IP}: {body}"
        );
        assert!(
            body.contains(sock.to_str().unwrap()),
            "{path}: the refusal names the socket: {body}"
        );
    }
    // Loopback is no different.
    let (status, _) = get(port, "/api/v1/terminations").unwrap();
    assert_eq!(status, 404);
    // The socket serves it, and only to root: 0600, root's.
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(owner(&sock), 0);
    let (status, body) = get_unix(&sock, "/api/v1/terminations").unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["terminations"].is_array(), "{v}");
    let out = as_nobody(&["why", "default/x", "--agent", sock.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("permission denied"), "{err}");
    // A socket whose mode someone widened: the agent itself closes a peer
    // that is neither root nor its own user.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&[
        "why",
        "default/x",
        "-o",
        "json",
        "--agent",
        sock.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // It connected (the mode let it), and was closed before any answer:
    // how the client notices (a broken pipe, a reset, an empty answer)
    // depends on when.
    assert!(
        out.stdout.is_empty()
            && !err.contains("permission denied")
            && err.contains(sock.to_str().unwrap()),
        "{err}"
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    agent.stop();
    assert!(!sock.exists(), "the socket goes with a clean end");
    drop(peer);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// The default socket, no flags

/// `podscope why` and `doctor`, without flags, against a real agent on the
/// default socket; with the test node, a real pod's termination.
#[test]
fn why_and_doctor_use_the_default_socket_without_flags() {
    let test = "why_and_doctor_use_the_default_socket_without_flags";
    if !privileged(test) {
        return;
    }
    let node = testnode().is_some();
    if !node {
        assert!(!required(), "{test}: podscope-testnode is not built");
        support::say_skipped(
            &format!("{test} (a pod's record)"),
            "podscope-testnode is not built; the socket is tested without pods",
        );
    }
    let default = Path::new(DEFAULT_SOCKET);
    assert!(
        std::os::unix::net::UnixStream::connect(default).is_err(),
        "{test}: an agent already serves {DEFAULT_SOCKET} on this machine"
    );
    let dir = scratch("default");
    let port = free_port();
    let mut args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--state-dir".into(),
        dir.join("state").to_str().unwrap().into(),
    ];
    if node {
        support::node(&["up"]);
        args.extend(["--cri-socket".into(), CRI_SOCKET.into()]);
    } else {
        args.push("--no-cri".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&args);
    assert_eq!(mode(default), 0o600);
    assert_eq!(owner(default), 0);
    assert_eq!(mode(default.parent().unwrap()), 0o700);
    assert_eq!(owner(default.parent().unwrap()), 0);

    let why = |pod: &str, json: bool| {
        let mut c = podscope();
        c.args(["why", &format!("{NS}/{pod}")]);
        if json {
            c.args(["-o", "json"]);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "why: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let v: Value = serde_json::from_str(&why("nothing", true)).unwrap();
    assert_eq!(v["terminations"], Value::Array(vec![]), "{v}");
    assert!(
        why("nothing", false).contains("no container of this pod has ended"),
        "the human form"
    );
    if node {
        // A pod left by an interrupted run would not exit again.
        drop(Pods(vec!["exits".into()]));
        let _cleanup = Pods(vec!["exits".into()]);
        support::apply(
            "api-exits",
            "exited",
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: exits\n  namespace: {NS}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    command: [\"sh\", \"-c\", \"exit 3\"]\n"
            ),
        );
        let mut record = Value::Null;
        support::wait_until("the pod's record, through `why`", 30, || {
            let v: Value = serde_json::from_str(&why("exits", true)).unwrap();
            record = v["terminations"]
                .as_array()
                .and_then(|a| a.last())
                .cloned()
                .unwrap_or_default();
            !record.is_null()
        });
        assert_eq!(record["exit_code"], 3, "{record}");
        assert_eq!(record["container"], "main", "{record}");
        let human = why("exits", false);
        assert!(
            human.starts_with(&format!("{NS}/exits container main: Error\n")),
            "{human}"
        );
    }

    // doctor's agent check asks the same socket.
    let out = podscope().args(["doctor", "-o", "json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .cloned()
        .unwrap();
    assert_ne!(check["status"], "untested", "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .starts_with(&format!("agent at {DEFAULT_SOCKET}: ")),
        "{check}"
    );

    // Not root: one sentence that says whose it is.
    let out = as_nobody(&["why", &format!("{NS}/exits")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(DEFAULT_SOCKET) && err.contains("permission denied"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    agent.stop();
    assert!(!default.exists(), "the socket goes with a clean end");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The test's pods, deleted even when it fails.
struct Pods(Vec<String>);

impl Drop for Pods {
    fn drop(&mut self) {
        if let Some(bin) = testnode() {
            for p in &self.0 {
                let _ = Command::new(&bin)
                    .args(["delete", &format!("{NS}/{p}"), "--wait"])
                    .output();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A socket left behind, or in use

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_names_its_holder() {
    let test = "a_stale_socket_is_replaced_and_a_live_one_names_its_holder";
    if !privileged(test) {
        return;
    }
    let dir = scratch("stale");
    let sock = dir.join("run/api.sock");
    let start = |state: &str| {
        Agent::start(&[
            "--no-cri",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--state-dir",
            dir.join(state).to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ])
    };
    let first = start("a");
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(
        mode(&dir.join("run")),
        0o700,
        "a directory it makes is 0700"
    );

    // An agent that must not start: (its exit code, its stderr).
    let refused = |state: &str| {
        let out = podscope()
            .args(["agent", "--no-cri", "--listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--state-dir")
            .arg(dir.join(state))
            .arg("--api-socket")
            .arg(&sock)
            .output()
            .unwrap();
        (out.status.code(), stderr(&out))
    };
    // A second agent (another state directory) on the same socket.
    let (code, err) = refused("b");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("in use by another process (PID {})", first.pid()))
            && err.contains("--api-socket"),
        "the refusal names the holder: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    assert_eq!(
        get_unix(&sock, "/api/v1/terminations").map(|r| r.0),
        Some(200),
        "the first one still serves"
    );

    // It dies without cleaning up: the next one replaces the socket.
    first.kill9();
    assert!(sock.exists(), "a killed agent leaves its socket");
    let next = start("c");
    let out = podscope()
        .args(["why", "default/x", "-o", "json", "--agent"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(mode(&sock), 0o600);
    next.stop();
    assert!(!sock.exists());

    // Something that is not a socket is never removed.
    std::fs::write(&sock, "not mine").unwrap();
    let (code, err) = refused("d");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "not mine");
    std::fs::remove_file(&sock).unwrap();

    // An agent killed while it was starting a command (iptables-save)
    // leaves its socket open in the child until that child execs: a real
    // listener that forks a child holding it for 1 s, and exits at once.
    const ORPHAN: &str = "import os, socket, sys, time\ns = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen()\nif os.fork() == 0:\n    time.sleep(1)\n    os._exit(0)\nos._exit(0)\n";
    let st = Command::new("python3")
        .args(["-c", ORPHAN])
        .arg(&sock)
        .status()
        .expect("python3 is needed for this test");
    assert!(st.success());
    assert!(
        std::os::unix::net::UnixStream::connect(&sock).is_ok(),
        "the orphaned socket still accepts"
    );
    // Its listener is gone: the agent waits for the socket to close, then
    // takes the path.
    let after = start("e");
    assert_eq!(
        get_unix(&sock, "/api/v1/terminations").map(|r| r.0),
        Some(200)
    );
    after.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------
// On TCP, when asked for

#[test]
fn api_listen_serves_with_the_token_or_a_client_certificate_and_refuses_the_rest() {
    let test = "api_listen_serves_with_the_token_or_a_client_certificate";
    if !privileged(test) {
        return;
    }
    for tool in ["openssl", "curl"] {
        if !which(tool) {
            assert!(
                !required(),
                "{test}: {tool} is needed: `cargo xtask setup` installs it"
            );
            support::say_skipped(test, &format!("no {tool}"));
            return;
        }
    }
    let dir = scratch("listen");
    new_ca(&dir, "ca");
    new_ca(&dir, "rogue-ca");
    issue(&dir, "ca", "server", Some("IP:127.0.0.1"), "11");
    issue(&dir, "ca", "client", None, "12");
    issue(&dir, "rogue-ca", "rogue", None, "13");
    std::fs::write(dir.join("token"), "api-s3cret\n").unwrap();
    std::fs::write(dir.join("wrong"), "api-s3cre\n").unwrap();
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let (port, api_port) = (free_port(), free_port());
    let agent = Agent::start(&[
        "--no-cri",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--state-dir",
        &p("state"),
        "--api-socket",
        &p("api.sock"),
        "--api-listen",
        &format!("127.0.0.1:{api_port}"),
        "--api-tls-cert",
        &p("server.pem"),
        "--api-tls-key",
        &p("server.key"),
        "--api-token-file",
        &p("token"),
        "--api-client-ca",
        &p("ca.pem"),
    ]);
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    // Trusting the agent's CA only.
    let curl = |port: u16, path: &str, extra: &[&str]| {
        let mut args = vec!["--cacert", "ca.pem"];
        args.extend_from_slice(extra);
        curl(&dir, port, path, &args)
    };
    for path in ["/api/v1/terminations", "/api/v1/events"] {
        // Without credentials, with a wrong token, a certificate of another CA: 401.
        assert_eq!(curl(api_port, path, &[]).0, "401", "{path}");
        assert_eq!(
            curl(api_port, path, &["-H", &bearer("api-s3cre")]).0,
            "401",
            "{path}"
        );
        assert_eq!(
            curl(api_port, path, &["-H", &bearer("api-s3cret2")]).0,
            "401",
            "{path}"
        );
        let rogue = curl(
            api_port,
            path,
            &["--cert", "rogue.pem", "--key", "rogue.key"],
        )
        .0;
        assert_ne!(rogue, "200", "{path}: a certificate of another CA");
    }
    // Plain HTTP on that port: nothing.
    assert_ne!(
        get(api_port, "/api/v1/terminations").map(|r| r.0),
        Some(200)
    );
    // The token, or the CA's client certificate: served.
    let (code, body) = curl(
        api_port,
        "/api/v1/terminations",
        &["-H", &bearer("api-s3cret")],
    );
    assert_eq!(code, "200", "{body}");
    assert!(body.starts_with("{\"terminations\":["), "{body}");
    let (code, _) = curl(
        api_port,
        "/api/v1/terminations",
        &["--cert", "client.pem", "--key", "client.key"],
    );
    assert_eq!(code, "200");
    // The stream, with the token: events flow.
    let mut stream = Command::new("curl")
        .current_dir(&dir)
        .args(["-sN", "--cacert", "ca.pem", "--max-time", "4", "-H"])
        .arg(bearer("api-s3cret"))
        .arg(format!("https://127.0.0.1:{api_port}/api/v1/events"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let _ = Command::new("true").status();
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    stream
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = stream.wait();
    assert!(
        out.lines().any(|l| l.contains("\"kind\":\"exit\"")),
        "no event on the authenticated stream: {out:.400}"
    );
    // The kubelet's probes stay open; they tell nothing.
    assert_eq!(curl(api_port, "/healthz", &[]).0, "200");

    // The CLI over https, with the CA and the token file.
    let why = |extra: &[&str]| {
        podscope()
            .args(["why", "default/x", "-o", "json"])
            .args(["--agent", &format!("https://127.0.0.1:{api_port}")])
            .args(["--agent-ca", &p("ca.pem")])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = why(&["--agent-token-file", &p("token")]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let v: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert!(v["terminations"].is_array(), "{v}");
    for extra in [&[][..], &["--agent-token-file", &p("wrong")][..]] {
        let out = why(extra);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("(401)"), "{err}");
    }
    // The metrics listener still has none of it, whatever the token.
    let (status, body) = get(port, "/api/v1/terminations").unwrap();
    assert_eq!(status, 404, "{body}");
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
