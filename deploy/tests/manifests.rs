//! Validates everything in deploy/ for real, with the tools `cargo xtask
//! setup` installs:
//!
//! - every Kubernetes manifest (and the DaemonSet with each of patches/
//!   applied) against the Kubernetes JSON schemas, strictly, with
//!   `kubernetes-validate` for the oldest and newest versions we support;
//! - the prometheus-operator objects (ServiceMonitor, PrometheusRule), whose
//!   CRD schemas are not in kubernetes-validate, by their structure here
//!   (recording rules named level:metric:operations after what they keep
//!   and rate), and the rules with `promtool check rules` and `promtool test
//!   rules` (tests/rules_test.yaml: what each recording rule records, when
//!   each alert fires and when it must not);
//! - every PromQL expression of the Grafana dashboard with promtool, that
//!   each returns data through the recording rules, that every recorded
//!   series a panel or alert reads is recorded (and read by something), and
//!   the dashboard's structure;
//! - every YAML file with `yamllint --strict` and deploy/.yamllint;
//! - the base and the patch overlays with real kustomize, where kubectl is;
//! - as root, the real agent run with the DaemonSet's arguments and
//!   environment (health, readiness, metrics, the API on its socket only,
//!   JSON logs, SIGTERM);
//! - the DaemonSet, Service, ServiceMonitor and Dockerfile against the agent's
//!   contracts (binary, flags, environment, port, probe paths, capabilities,
//!   mounts), so that a rename on either side breaks a test.
//!
//! When a tool is missing the test prints a SKIPPED line and passes, unless
//! PODSCOPE_REQUIRE_KERNEL_TESTS=1 (as `cargo xtask test` sets as root): then
//! it fails. No Prometheus server is started: promtool evaluates rules itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    env, fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// Kubernetes versions the manifests must be valid for: an old one still in
/// wide use (the manifests use nothing newer) and the newest the pinned
/// kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// The agent's contract (issue 4; see the DaemonSet's comments).
const BINARY: &str = "/usr/local/bin/podscope";
const PORT: i64 = 9811;
/// kube-rbac-proxy's port on the node, which the Service and ServiceMonitor name.
const PORT_NAME: &str = "https";
const STATE_DIR: &str = "/var/lib/podscope";
/// The node-wide API's socket (the agent's default), in the node's
/// /run/podscope mounted read-write at the same path.
const API_SOCKET: &str = "/run/podscope/api.sock";
const RUN_DIR: &str = "/run/podscope";
const CRI_SOCKET: &str = "/run/containerd/containerd.sock";
/// BPF loads programs and maps, PERFMON attaches tracing programs,
/// NET_ADMIN reads kube-proxy's rules (iptables-save) and loads the BPF
/// netfilter programs.
const CAPABILITIES: &[&str] = &["BPF", "PERFMON", "NET_ADMIN"];
/// Host paths the agent reads, mounted at the same path, read-only.
const READ_ONLY_HOST_PATHS: &[&str] = &[
    "/sys/kernel/btf",
    "/sys/fs/cgroup",
    "/sys/kernel/tracing",
    "/run/containerd",
];
/// The metrics the alerts and the dashboard are built on.
const METRICS: &[&str] = &[
    "podscope_process_exits_total",
    "podscope_events_total",
    "podscope_events_lost_total",
    "podscope_probe_attached",
    "podscope_tracked_containers",
    "podscope_build_info",
    "podscope_series_refused_total",
    "podscope_cri_errors_total",
    "podscope_journal_pending_records",
];
const SEVERITIES: &[&str] = &["critical", "warning", "info"];

// ---------------------------------------------------------------------------
// Files and tools

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = deploy_dir().join(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("deploy/{rel} is not YAML: {e}"))
}

fn json(rel: &str) -> Json {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("deploy/{rel} is not JSON: {e}"))
}

/// `v[a][b]...` for string keys and sequence indices written as numbers.
fn at<'a>(v: &'a Yaml, path: &str) -> &'a Yaml {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[k],
    })
}

fn s<'a>(v: &'a Yaml, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string: {:?}", at(v, path)))
}

fn seq<'a>(v: &'a Yaml, path: &str) -> &'a [Yaml] {
    at(v, path)
        .as_sequence()
        .map(|s| s.as_slice())
        .unwrap_or_else(|| panic!("`{path}` is not a list"))
}

/// The resources kustomization.yaml lists, parsed, with their file names.
fn resources() -> Vec<(String, Yaml)> {
    seq(&yaml("kustomization.yaml"), "resources")
        .iter()
        .flat_map(|r| {
            let f = r.as_str().expect("resource is a file name").to_string();
            // A file may hold several documents (rbac.yaml).
            serde_yaml::Deserializer::from_str(&read(&f))
                .map(|d| {
                    let doc = Yaml::deserialize(d)
                        .unwrap_or_else(|e| panic!("deploy/{f} is not YAML: {e}"));
                    (f.clone(), doc)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn resource(kind: &str) -> Yaml {
    let mut found: Vec<Yaml> = resources()
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} in kustomization.yaml"
    );
    found.remove(0)
}

fn is_operator_crd(doc: &Yaml) -> bool {
    doc["apiVersion"]
        .as_str()
        .is_some_and(|a| a.starts_with("monitoring.coreos.com/"))
}

fn required() -> bool {
    env::var_os("PODSCOPE_REQUIRE_KERNEL_TESTS").is_some_and(|v| v == "1")
}

/// Says that `test` is skipped, visibly (libtest captures eprintln!).
fn skipped(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The tool's path: from the set-up's virtualenv, else from PATH. None (after
/// a SKIPPED line) when it is missing, or a failure when tests are required.
fn tool(test: &str, name: &str) -> Option<PathBuf> {
    let venv = xtask::toolchain::python_venv().join("bin").join(name);
    let found = std::iter::once(venv)
        .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default()).map(|d| d.join(name)))
        .find(|p| xtask::toolchain::is_executable(p));
    if found.is_none() {
        let why = format!("`{name}` is not installed (run `cargo xtask setup`)");
        assert!(
            !required(),
            "{test}: {why}, and PODSCOPE_REQUIRE_KERNEL_TESTS=1"
        );
        skipped(test, &why);
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A scratch directory for one test, emptied first.
fn scratch(test: &str) -> PathBuf {
    let d = env::temp_dir().join(format!("podscope-deploy-{}-{test}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("scratch dir");
    d
}

// ---------------------------------------------------------------------------
// Kubernetes schemas

#[test]
fn kustomization_lists_every_manifest() {
    let listed: BTreeSet<String> = resources().into_iter().map(|(f, _)| f).collect();
    // (a file with several documents is listed once)
    let on_disk: BTreeSet<String> = fs::read_dir(deploy_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml must list every manifest in deploy/"
    );
    for (f, doc) in resources() {
        let kind = s(&doc, "kind");
        if !["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&kind) {
            assert_eq!(s(&doc, "metadata.namespace"), "podscope", "{f}: namespace");
        }
    }
    // The image name kustomize rewrites is the one the DaemonSet uses.
    let kustomization = yaml("kustomization.yaml");
    let images = seq(&kustomization, "images");
    let ds = resource("DaemonSet");
    assert_eq!(
        s(&images[0], "name"),
        s(&ds, "spec.template.spec.containers.0.image")
    );
}

#[test]
fn manifests_match_the_kubernetes_schemas() {
    let test = "manifests_match_the_kubernetes_schemas";
    let Some(kv) = tool(test, "kubernetes-validate") else {
        return;
    };
    let dir = scratch(test);
    // One document per file (rbac.yaml holds three), so that each is counted.
    let mut files: Vec<PathBuf> = resources()
        .into_iter()
        .filter(|(_, d)| !is_operator_crd(d))
        .enumerate()
        .map(|(i, (f, d))| {
            let out = dir.join(format!("{i}-{f}"));
            fs::write(&out, serde_yaml::to_string(&d).unwrap()).unwrap();
            out
        })
        .collect();
    // The DaemonSet as each documented patch leaves it must be valid too.
    for patch in patch_files() {
        let patched = patched_daemonset(&patch);
        let out = dir.join(format!("daemonset+{patch}"));
        fs::write(&out, serde_yaml::to_string(&patched).unwrap()).unwrap();
        files.push(out);
    }
    for version in KUBERNETES_VERSIONS {
        let o = run(Command::new(&kv)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files));
        let out = text(&o);
        assert!(
            o.status.success(),
            "kubernetes-validate {version} failed:\n{out}"
        );
        // Unknown kinds are only a warning for kubernetes-validate.
        assert!(
            !out.contains("WARN") && !out.contains("ERROR"),
            "kubernetes-validate {version}:\n{out}"
        );
        assert_eq!(
            out.matches(" passed ").count(),
            files.len(),
            "every file must pass against {version}:\n{out}"
        );
    }
    let _ = fs::remove_dir_all(dir);
}

fn patch_files() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(deploy_dir().join("patches"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

/// The DaemonSet with patches/`name` (RFC 6902 replace/add ops) applied.
/// A `replace` of an object that has a `name` must keep the name: the patches
/// index into lists, so reordering daemonset.yaml must break them loudly.
fn patched_daemonset(name: &str) -> Json {
    let mut ds = serde_json::to_value(resource("DaemonSet")).unwrap();
    let ops = serde_json::to_value(yaml(&format!("patches/{name}"))).unwrap();
    for op in ops.as_array().expect("a patch is a list of operations") {
        let path = op["path"].as_str().expect("op path");
        let value = op["value"].clone();
        match op["op"].as_str() {
            Some("replace") => {
                let old = ds
                    .pointer_mut(path)
                    .unwrap_or_else(|| panic!("patches/{name}: {path} is not in daemonset.yaml"));
                if let (Some(a), Some(b)) = (old.get("name"), value.get("name")) {
                    assert_eq!(a, b, "patches/{name}: {path} now holds something else");
                }
                *old = value;
            }
            Some("add") => {
                let (parent, key) = path.rsplit_once('/').unwrap();
                let p = ds
                    .pointer_mut(parent)
                    .unwrap_or_else(|| panic!("patches/{name}: {parent} is not in daemonset.yaml"));
                match p {
                    Json::Array(a) if key == "-" => a.push(value),
                    Json::Array(a) => a.insert(key.parse().unwrap(), value),
                    Json::Object(m) => {
                        m.insert(key.to_string(), value);
                    }
                    _ => panic!("patches/{name}: cannot add under {parent}"),
                }
            }
            other => panic!("patches/{name}: unsupported op {other:?}"),
        }
    }
    ds
}

#[test]
fn patches_do_what_the_readme_says() {
    let crio = patched_daemonset("cri-o.yaml");
    let c = &crio["spec"]["template"]["spec"]["containers"][0];
    let env_of = |n: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        env_of("PODSCOPE_CRI_SOCKET"),
        Some(Json::from("/run/crio/crio.sock"))
    );
    let socket_dir_mounted = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["mountPath"] == "/run/crio");
    assert!(socket_dir_mounted);
    let vols = crio["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(vols.iter().any(|v| v["hostPath"]["path"] == "/run/crio"));
    assert!(
        !vols
            .iter()
            .any(|v| v["hostPath"]["path"] == "/run/containerd")
    );

    let old = patched_daemonset("kernel-pre-5.8.yaml");
    let caps = &old["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(caps["add"], serde_json::json!(["SYS_ADMIN", "NET_ADMIN"]));
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
}

/// Real kustomize (kubectl's) builds deploy/ and an overlay with each patch
/// as README.md describes, and its result is what the tests above validated.
/// kubectl is not something the set-up installs (no registry we use has it),
/// so its absence is a visible skip even when tests are required.
#[test]
fn kustomize_builds_the_base_and_the_overlays() {
    let test = "kustomize_builds_the_base_and_the_overlays";
    let kubectl = env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("kubectl"))
        .find(|p| xtask::toolchain::is_executable(p));
    let Some(kubectl) = kubectl else {
        let why = "`kubectl` (for `kubectl kustomize`) is not installed";
        assert!(
            !required(),
            "{test}: {why}, and PODSCOPE_REQUIRE_KERNEL_TESTS=1"
        );
        skipped(test, why);
        return;
    };
    let build = |dir: &Path| -> Vec<Json> {
        let o = run(Command::new(&kubectl).arg("kustomize").arg(dir));
        assert!(
            o.status.success(),
            "kubectl kustomize {}:\n{}",
            dir.display(),
            text(&o)
        );
        serde_yaml::Deserializer::from_slice(&o.stdout)
            .map(|d| serde_json::to_value(Yaml::deserialize(d).unwrap()).unwrap())
            .collect()
    };
    let built = build(&deploy_dir());
    let names = |docs: &[Json]| -> BTreeSet<String> {
        docs.iter()
            .map(|d| {
                format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap(),
                    d["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    };
    let listed: Vec<Json> = resources()
        .into_iter()
        .map(|(_, d)| serde_json::to_value(d).unwrap())
        .collect();
    assert_eq!(names(&built), names(&listed));
    let daemonset = |docs: Vec<Json>| docs.into_iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let image = daemonset(built)["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    assert_ne!(image, "podscope", "kustomization.yaml sets the image tag");

    let dir = scratch(test);
    for patch in patch_files() {
        let overlay = dir.join(patch.trim_end_matches(".yaml"));
        fs::create_dir_all(&overlay).unwrap();
        fs::copy(
            deploy_dir().join("patches").join(&patch),
            overlay.join(&patch),
        )
        .unwrap();
        // Kustomize wants a relative path to the base.
        let up = "../".repeat(overlay.components().count() - 1);
        let base = format!(
            "{up}{}",
            deploy_dir().display().to_string().trim_start_matches('/')
        );
        fs::write(
            overlay.join("kustomization.yaml"),
            format!(
                "resources:\n  - {base}\npatches:\n  - path: {patch}\n    target: {{kind: DaemonSet, name: podscope}}\n"
            ),
        )
        .unwrap();
        let mut want = patched_daemonset(&patch);
        want["spec"]["template"]["spec"]["containers"][0]["image"] = image.clone();
        assert_eq!(
            daemonset(build(&overlay)),
            want,
            "kustomize applies patches/{patch} differently from what the tests validated"
        );
    }

    // The native-TLS component, used from an overlay as README.md shows:
    // the agent alone, on the node's address with TLS and client
    // certificates; no proxy, no token, no RBAC; the ServiceMonitor with a
    // client certificate.
    let overlay = dir.join("native-tls");
    fs::create_dir_all(&overlay).unwrap();
    let up = "../".repeat(overlay.components().count() - 1);
    let base = format!(
        "{up}{}",
        deploy_dir().display().to_string().trim_start_matches('/')
    );
    fs::write(
        overlay.join("kustomization.yaml"),
        format!("resources:\n  - {base}\ncomponents:\n  - {base}/components/native-tls\n"),
    )
    .unwrap();
    let docs = build(&overlay);
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"].as_str().unwrap().contains("Role")),
        "no RBAC without the proxy"
    );
    let ds = daemonset(docs.clone());
    let pod = &ds["spec"]["template"]["spec"];
    let cs = pod["containers"].as_array().unwrap();
    assert_eq!(cs.len(), 1, "no kube-rbac-proxy");
    let env: BTreeMap<&str, &str> = cs[0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    assert_eq!(env["PODSCOPE_LISTEN"], format!("0.0.0.0:{PORT}"));
    for k in [
        "PODSCOPE_METRICS_TLS_CERT",
        "PODSCOPE_METRICS_TLS_KEY",
        "PODSCOPE_METRICS_CLIENT_CA",
    ] {
        let file = env[k];
        let mounted = cs[0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| file.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())));
        assert!(mounted, "{k}={file} is in a mounted Secret");
    }
    assert_eq!(cs[0]["ports"][0]["hostPort"], Json::from(PORT));
    assert_eq!(cs[0]["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert!(
        !pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "kube-api-access"),
        "no token in the pod"
    );
    let sm = docs.iter().find(|d| d["kind"] == "ServiceMonitor").unwrap();
    let ep = &sm["spec"]["endpoints"][0];
    assert!(ep.get("bearerTokenFile").is_none());
    assert_eq!(ep["tlsConfig"]["cert"]["secret"]["key"], "tls.crt");
    assert_eq!(ep["tlsConfig"]["serverName"], "podscope.podscope.svc");
    let _ = fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// The agent's contract

/// The agent's container (the first: patches index it as containers/0).
fn container(ds: &Yaml) -> &Yaml {
    let cs = seq(ds, "spec.template.spec.containers");
    assert_eq!(
        s(&cs[0], "name"),
        "agent",
        "the agent is the first container"
    );
    &cs[0]
}

/// The kube-rbac-proxy sidecar.
fn proxy(ds: &Yaml) -> &Yaml {
    let cs = seq(ds, "spec.template.spec.containers");
    assert_eq!(cs.len(), 2, "the agent and kube-rbac-proxy");
    assert_eq!(s(&cs[1], "name"), "kube-rbac-proxy");
    &cs[1]
}

fn env_map(c: &Yaml) -> BTreeMap<String, Yaml> {
    seq(c, "env")
        .iter()
        .map(|e| (s(e, "name").to_string(), e.clone()))
        .collect()
}

#[test]
fn daemonset_matches_the_agent_contract() {
    let ds = resource("DaemonSet");
    let pod = at(&ds, "spec.template.spec");
    let c = container(&ds);

    // Binary and subcommand: the image's ENTRYPOINT runs the binary.
    assert!(c.get("command").is_none(), "keep the image's ENTRYPOINT");
    assert_eq!(s(c, "args.0"), "agent");

    // Scheduling.
    assert_eq!(pod["hostPID"], Yaml::from(true));
    // The node's network namespace, where kube-proxy's rules and the
    // node's traffic are; with it, cluster DNS must be asked for explicitly
    // (the default policy would use the node's resolv.conf), and the
    // metrics port is a port of the node: hostPort equal to containerPort.
    assert_eq!(pod["hostNetwork"], Yaml::from(true));
    assert_eq!(s(pod, "dnsPolicy"), "ClusterFirstWithHostNet");
    assert_eq!(s(pod, "priorityClassName"), "system-node-critical");
    assert_eq!(pod["terminationGracePeriodSeconds"], Yaml::from(10));
    let tolerates_all = seq(pod, "tolerations")
        .iter()
        .any(|t| t["operator"].as_str() == Some("Exists") && t.get("key").is_none());
    assert!(
        tolerates_all,
        "must tolerate every taint (control plane included)"
    );
    assert_eq!(s(&ds, "spec.updateStrategy.type"), "RollingUpdate");
    assert_eq!(
        s(&ds, "spec.updateStrategy.rollingUpdate.maxUnavailable"),
        "10%"
    );
    assert_eq!(pod["automountServiceAccountToken"], Yaml::from(false));

    // Privileges: root, only CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN.
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsUser"], Yaml::from(0));
    assert_eq!(sc["allowPrivilegeEscalation"], Yaml::from(false));
    assert_eq!(sc["readOnlyRootFilesystem"], Yaml::from(true));
    assert_ne!(sc["privileged"], Yaml::from(true));
    let caps = |k: &str| -> Vec<&str> {
        seq(sc, &format!("capabilities.{k}"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    };
    assert_eq!(caps("drop"), ["ALL"]);
    assert_eq!(caps("add"), CAPABILITIES);

    // No port of the node: the agent listens on loopback, where the
    // kubelet (in the node's network namespace) probes it.
    assert!(
        c.get("ports").is_none(),
        "the agent declares no (host) port"
    );
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        assert_eq!(s(c, &format!("{probe}.httpGet.path")), path, "{probe}");
        assert_eq!(
            s(c, &format!("{probe}.httpGet.host")),
            "127.0.0.1",
            "{probe}"
        );
        assert_eq!(
            at(c, &format!("{probe}.httpGet.port")),
            &Yaml::from(PORT),
            "{probe}"
        );
    }

    // Environment.
    let env = env_map(c);
    let value = |k: &str| {
        env.get(k)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("env {k} is not set"))
    };
    assert_eq!(value("PODSCOPE_LISTEN"), format!("127.0.0.1:{PORT}"));
    assert_eq!(value("PODSCOPE_STATE_DIR"), STATE_DIR);
    assert_eq!(value("PODSCOPE_CRI_SOCKET"), CRI_SOCKET);
    assert_eq!(value("PODSCOPE_LOG_FORMAT"), "json");
    assert_eq!(value("PODSCOPE_API_SOCKET"), API_SOCKET);
    assert!(
        API_SOCKET.starts_with(&format!("{RUN_DIR}/")),
        "the API socket must be inside the run mount"
    );
    // Nothing puts the node-wide API on TCP.
    assert!(!env.contains_key("PODSCOPE_API_LISTEN"));
    assert_eq!(
        s(&env["PODSCOPE_NODE_NAME"], "valueFrom.fieldRef.fieldPath"),
        "spec.nodeName"
    );
    for k in env.keys() {
        assert!(k.starts_with("PODSCOPE_"), "unexpected env {k}");
    }

    // Mounts: each host path at the same path, read-only except the state
    // and the API socket's directory.
    let volumes: BTreeMap<&str, &str> = seq(pod, "volumes")
        .iter()
        .filter(|v| v.get("hostPath").is_some())
        .map(|v| (s(v, "name"), s(v, "hostPath.path")))
        .collect();
    let mounts: BTreeMap<&str, (&str, bool)> = seq(c, "volumeMounts")
        .iter()
        .map(|m| {
            let host = volumes[s(m, "name")];
            (host, (s(m, "mountPath"), m["readOnly"] == true))
        })
        .collect();
    let mut expected: BTreeMap<&str, (&str, bool)> = READ_ONLY_HOST_PATHS
        .iter()
        .map(|p| (*p, (*p, true)))
        .collect();
    expected.insert(STATE_DIR, (STATE_DIR, false));
    expected.insert(RUN_DIR, (RUN_DIR, false));
    assert_eq!(mounts, expected);
    assert!(
        READ_ONLY_HOST_PATHS
            .iter()
            .any(|d| CRI_SOCKET.starts_with(&format!("{d}/"))),
        "the CRI socket must be inside a mounted directory"
    );
    // Besides the host paths, only the proxy's projected token.
    for v in seq(pod, "volumes") {
        assert!(
            v.get("hostPath").is_some() || s(v, "name") == "kube-api-access",
            "unexpected volume {}",
            s(v, "name")
        );
    }

    // Resources from the measured footprint: a memory request above the
    // 31 MiB start-up peak, a memory limit, no CPU limit (see the comments).
    let mib = |q: &str| -> u64 {
        q.strip_suffix("Mi")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("memory `{q}` in Mi"))
    };
    let req = mib(s(c, "resources.requests.memory"));
    let lim = mib(s(c, "resources.limits.memory"));
    assert!(
        req > 31 && lim >= req * 2,
        "requests {req}Mi, limit {lim}Mi"
    );
    assert!(at(c, "resources.requests.cpu").as_str().is_some());
    assert!(at(c, "resources.limits.cpu").is_null(), "no CPU limit");

    // Flags given as args are the agent's documented ones.
    for a in seq(c, "args").iter().skip(1) {
        let flag = a.as_str().unwrap().split('=').next().unwrap();
        assert!(
            ["--series-retention", "--max-series", "--config"].contains(&flag),
            "unknown flag {flag}"
        );
    }
}

/// kube-rbac-proxy, as kube-prometheus runs it beside node-exporter: TLS on
/// the node's address, the agent's loopback listener upstream, only
/// /metrics, unprivileged, the only container with an API token.
#[test]
fn kube_rbac_proxy_guards_the_metrics() {
    let ds = resource("DaemonSet");
    let p = proxy(&ds);
    let args: Vec<&str> = seq(p, "args").iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&format!("--secure-listen-address=[$(NODE_IP)]:{PORT}").as_str()));
    assert!(args.contains(&format!("--upstream=http://127.0.0.1:{PORT}/").as_str()));
    assert!(args.contains(&"--allow-paths=/metrics"), "{args:?}");
    let env = env_map(p);
    assert_eq!(
        s(&env["NODE_IP"], "valueFrom.fieldRef.fieldPath"),
        "status.podIP"
    );
    let ports = seq(p, "ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(s(&ports[0], "name"), PORT_NAME);
    assert_eq!(ports[0]["containerPort"], Yaml::from(PORT));
    assert_eq!(
        ports[0]["hostPort"],
        Yaml::from(PORT),
        "hostNetwork: the port is the node's"
    );
    let sc = &p["securityContext"];
    assert_eq!(sc["runAsNonRoot"], Yaml::from(true));
    assert_eq!(sc["allowPrivilegeEscalation"], Yaml::from(false));
    assert_eq!(sc["readOnlyRootFilesystem"], Yaml::from(true));
    assert_eq!(s(sc, "capabilities.drop.0"), "ALL");
    assert!(sc["capabilities"].get("add").is_none());
    // The token is mounted here and nowhere else.
    let mounts: Vec<&str> = seq(p, "volumeMounts")
        .iter()
        .map(|m| s(m, "name"))
        .collect();
    assert_eq!(mounts, ["kube-api-access"]);
    let agent_mounts: Vec<&str> = seq(container(&ds), "volumeMounts")
        .iter()
        .map(|m| s(m, "name"))
        .collect();
    assert!(!agent_mounts.contains(&"kube-api-access"));
    let vol = seq(&ds, "spec.template.spec.volumes")
        .iter()
        .find(|v| s(v, "name") == "kube-api-access")
        .expect("the projected token volume");
    let sources = seq(vol, "projected.sources");
    assert_eq!(s(&sources[0], "serviceAccountToken.path"), "token");
    assert!(
        at(
            &ds,
            "spec.template.spec.containers.1.resources.limits.memory"
        )
        .as_str()
        .is_some()
    );
}

#[test]
fn service_and_service_account_fit_the_daemonset() {
    let ds = resource("DaemonSet");
    let svc = resource("Service");
    let sa = resource("ServiceAccount");
    assert_eq!(s(&svc, "spec.clusterIP"), "None", "headless");
    let pod_labels = at(&ds, "spec.template.metadata.labels");
    for (k, v) in at(&svc, "spec.selector").as_mapping().unwrap() {
        assert_eq!(&pod_labels[k], v, "the Service selects the agent pods");
    }
    let ports = seq(&svc, "spec.ports");
    assert_eq!(s(&ports[0], "name"), PORT_NAME);
    assert_eq!(ports[0]["port"], Yaml::from(PORT));
    assert_eq!(s(&ports[0], "targetPort"), PORT_NAME);
    assert_eq!(
        s(&ds, "spec.template.spec.serviceAccountName"),
        s(&sa, "metadata.name")
    );
    assert_eq!(sa["automountServiceAccountToken"], Yaml::from(false));
    // RBAC: kube-rbac-proxy's TokenReview and SubjectAccessReview, bound to
    // the agent's ServiceAccount, and GET /metrics for scrapers. Nothing else:
    // the agent itself reads nothing from the API server.
    let mut rules = BTreeSet::new();
    let mut bound = vec![];
    for (f, d) in resources() {
        match s(&d, "kind") {
            "ClusterRole" | "Role" => {
                for r in seq(&d, "rules") {
                    let list = |k: &str| -> Vec<String> {
                        r.get(k)
                            .and_then(|v| v.as_sequence())
                            .map(|v| v.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                            .unwrap_or_default()
                    };
                    rules.insert((
                        s(&d, "metadata.name").to_string(),
                        list("resources").join(",") + &list("nonResourceURLs").join(","),
                        list("verbs").join(","),
                    ));
                }
            }
            "ClusterRoleBinding" | "RoleBinding" => {
                bound.push((
                    s(&d, "roleRef.name").to_string(),
                    s(&d, "subjects.0.name").to_string(),
                ));
            }
            k => assert!(!k.contains("Role"), "{f}: {k}"),
        }
    }
    let want: BTreeSet<(String, String, String)> = [
        ("podscope-kube-rbac-proxy", "tokenreviews", "create"),
        ("podscope-kube-rbac-proxy", "subjectaccessreviews", "create"),
        ("podscope-metrics-reader", "/metrics", "get"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(rules, want);
    assert_eq!(
        bound,
        [(
            "podscope-kube-rbac-proxy".to_string(),
            s(&sa, "metadata.name").to_string()
        )]
    );
}

// ---------------------------------------------------------------------------
// prometheus-operator objects

/// Keys allowed at a place in a CRD object: a misspelt field would be
/// dropped silently by the API server.
fn only_keys(v: &Yaml, place: &str, allowed: &[&str]) {
    for k in v
        .as_mapping()
        .unwrap_or_else(|| panic!("{place}: not a map"))
        .keys()
    {
        let k = k.as_str().unwrap();
        assert!(allowed.contains(&k), "{place}: unknown field `{k}`");
    }
}

#[test]
fn servicemonitor_scrapes_the_service() {
    let sm = resource("ServiceMonitor");
    let svc = resource("Service");
    assert_eq!(s(&sm, "apiVersion"), "monitoring.coreos.com/v1");
    only_keys(
        &sm["spec"],
        "spec",
        &[
            "selector",
            "namespaceSelector",
            "endpoints",
            "jobLabel",
            "targetLabels",
            "podTargetLabels",
            "sampleLimit",
        ],
    );
    let svc_labels = at(&svc, "metadata.labels");
    for (k, v) in at(&sm, "spec.selector.matchLabels").as_mapping().unwrap() {
        assert_eq!(&svc_labels[k], v, "the ServiceMonitor selects the Service");
    }
    let ns: Vec<&str> = seq(&sm, "spec.namespaceSelector.matchNames")
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(ns.contains(&s(&svc, "metadata.namespace")));
    let eps = seq(&sm, "spec.endpoints");
    assert_eq!(eps.len(), 1);
    let ep = &eps[0];
    only_keys(
        ep,
        "endpoint",
        &[
            "port",
            "path",
            "scheme",
            "interval",
            "scrapeTimeout",
            "honorLabels",
            "honorTimestamps",
            "relabelings",
            "metricRelabelings",
            "bearerTokenFile",
            "tlsConfig",
        ],
    );
    assert_eq!(s(ep, "port"), PORT_NAME);
    // Through kube-rbac-proxy with Prometheus' ServiceAccount token.
    assert_eq!(s(ep, "scheme"), "https");
    assert_eq!(
        s(ep, "bearerTokenFile"),
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
    assert_eq!(s(ep, "path"), "/metrics");
    assert_eq!(s(ep, "interval"), "30s");
    // Workload labels (namespace, pod, container) must survive the scrape.
    assert_eq!(ep["honorLabels"], Yaml::from(true));
    let relabel = seq(ep, "relabelings");
    for r in relabel {
        only_keys(
            r,
            "relabeling",
            &[
                "sourceLabels",
                "separator",
                "targetLabel",
                "regex",
                "modulus",
                "replacement",
                "action",
            ],
        );
    }
    let node = relabel
        .iter()
        .find(|r| r["targetLabel"].as_str() == Some("node"));
    let node = node.expect("a relabeling sets the node label");
    assert_eq!(s(node, "sourceLabels.0"), "__meta_kubernetes_pod_node_name");
}

// ---------------------------------------------------------------------------
// Recording rules, and the PromQL that reads them

/// The labels a recording rule may keep beside its level's: the family's
/// one closed-set label (`command` is bounded by the agent, 8 a container).
const FAMILY_LABELS: &[&str] = &[
    "outcome",
    "reason",
    "trigger",
    "scope",
    "cause",
    "command",
    "source",
    "runtime_reason",
];

/// A recording rule of prometheusrule.yaml, taken apart.
struct Recording {
    /// `level:metric:operations`.
    name: String,
    expr: String,
    /// The labels the recorded series keep (its `sum by`).
    by: Vec<String>,
}

/// Every recording rule, each checked to be what its name says:
/// `sum by (LEVEL[, FAMILY_LABEL]) (rate(METRIC_total{job="podscope"}[W]))`
/// recorded as `LEVEL:METRIC:rateW`, LEVEL the labels kept joined by `_`.
fn recordings() -> Vec<Recording> {
    let job = format!("{{job=\"{}\"}}", s(&resource("Service"), "metadata.name"));
    let mut out = Vec::new();
    for g in seq(&resource("PrometheusRule"), "spec.groups") {
        for r in seq(g, "rules") {
            let Some(name) = r["record"].as_str() else {
                continue;
            };
            let expr = s(r, "expr");
            let flat = expr
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace("( ", "(")
                .replace(" )", ")");
            let shape = || format!("{name}: `{flat}` is not `sum by (…) (rate(…_total{job}[…]))`");
            let (by, rest) = flat
                .strip_prefix("sum by (")
                .and_then(|r| r.split_once(") (rate("))
                .unwrap_or_else(|| panic!("{}", shape()));
            let (selector, window) = rest
                .strip_suffix("]))")
                .and_then(|r| r.split_once('['))
                .unwrap_or_else(|| panic!("{}", shape()));
            let raw = selector
                .strip_suffix(&job)
                .unwrap_or_else(|| panic!("{}", shape()));
            let parts: Vec<&str> = name.split(':').collect();
            let [level, metric, operations] = parts[..] else {
                panic!("{name}: not level:metric:operations");
            };
            assert_eq!(
                Some(metric),
                raw.strip_suffix("_total"),
                "{name}: the metric part is the counter it rates, without _total"
            );
            assert!(metric.starts_with("podscope_"), "{name}");
            assert_eq!(
                operations,
                format!("rate{window}"),
                "{name}: the operation names the window"
            );
            let by: Vec<String> = by.split(", ").map(str::to_string).collect();
            let kept: Vec<&str> = level.split('_').collect();
            assert!(
                by.len() >= kept.len() && by[..kept.len()] == kept[..],
                "{name}: keeps ({}) but its level says {level}",
                by.join(", ")
            );
            assert!(
                by.len() <= kept.len() + 1
                    && by[kept.len()..]
                        .iter()
                        .all(|l| FAMILY_LABELS.contains(&l.as_str())),
                "{name}: besides its level it may keep one of {FAMILY_LABELS:?}, not {:?}",
                &by[kept.len()..]
            );
            out.push(Recording {
                name: name.to_string(),
                expr: expr.to_string(),
                by,
            });
        }
    }
    out
}

/// The series selectors of a PromQL expression, with the label names each
/// matches on: `a:b:c{x="1", y=~"2"}` gives ("a:b:c", [x, y]). Only
/// podscope's metrics, `up` and recorded series (any name with a colon)
/// count; strings and `[…]` ranges are skipped.
fn selectors(q: &str) -> Vec<(String, Vec<String>)> {
    fn skip_string(b: &[u8], mut i: usize) -> usize {
        let quote = b[i];
        i += 1;
        while i < b.len() && b[i] != quote {
            i += if b[i] == b'\\' && quote != b'`' { 2 } else { 1 };
        }
        i + 1
    }
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let b = q.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = skip_string(b, i),
            b'[' => i = q[i..].find(']').map_or(b.len(), |j| i + j + 1),
            c if word(c) => {
                let start = i;
                while i < b.len() && word(b[i]) {
                    i += 1;
                }
                let name = &q[start..i];
                if !(name.contains(':') || name.starts_with("podscope_") || name == "up") {
                    continue;
                }
                let mut labels = Vec::new();
                let rest = q[i..].trim_start();
                if rest.starts_with('{') {
                    i = b.len() - rest.len() + 1;
                    while i < b.len() && b[i] != b'}' {
                        if matches!(b[i], b'"' | b'\'' | b'`') {
                            i = skip_string(b, i);
                        } else if word(b[i]) {
                            let l = i;
                            while i < b.len() && word(b[i]) {
                                i += 1;
                            }
                            labels.push(q[l..i].to_string());
                        } else {
                            i += 1;
                        }
                    }
                }
                out.push((name.to_string(), labels));
            }
            _ => i += 1,
        }
    }
    out
}

/// The recorded series `q` reads must be recorded, and matched only on
/// labels they keep (a recorded series has no job or instance: a selector
/// on those would match nothing, silently).
fn check_recorded_reads(place: &str, q: &str, recorded: &[Recording]) {
    for (name, labels) in selectors(q) {
        if !name.contains(':') {
            continue;
        }
        let rec = recorded
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{place}: reads {name}, which no recording rule records"));
        for l in labels {
            assert!(
                rec.by.contains(&l),
                "{place}: matches {name} on `{l}`, which it does not keep ({})",
                rec.by.join(", ")
            );
        }
    }
}

/// `q` followed by the expressions of the recorded series it reads: what
/// it reads in the end.
fn with_recordings(q: &str, recorded: &[Recording]) -> String {
    let mut out = q.to_string();
    for (name, _) in selectors(q) {
        if let Some(r) = recorded.iter().find(|r| r.name == name) {
            out.push('\n');
            out.push_str(&r.expr);
        }
    }
    out
}

/// Every recorded series is read by the dashboard or an alert: a recording
/// nobody reads only costs series.
#[test]
fn every_recorded_series_is_read() {
    let d = json("grafana/podscope.json");
    let mut read: Vec<String> = dashboard_queries(&d).into_iter().map(|(_, q)| q).collect();
    for g in seq(&resource("PrometheusRule"), "spec.groups") {
        for r in seq(g, "rules") {
            if r.get("alert").is_some() {
                read.push(s(r, "expr").to_string());
            }
        }
    }
    let names: BTreeSet<String> = read
        .iter()
        .flat_map(|q| selectors(q))
        .map(|(n, _)| n)
        .collect();
    for r in recordings() {
        assert!(
            names.contains(&r.name),
            "{}: recorded but read by no panel or alert",
            r.name
        );
    }
}

#[test]
fn selectors_find_metrics_and_their_labels() {
    assert_eq!(
        selectors(
            r#"sum by (node) (a:b:rate10m{x="}{", y=~"a\"b"}) > 0 unless up{job="p"} or podscope_x_total[5m:1m] * on (node) c"#
        ),
        [
            (
                "a:b:rate10m".to_string(),
                vec!["x".to_string(), "y".to_string()]
            ),
            ("up".to_string(), vec!["job".to_string()]),
            ("podscope_x_total".to_string(), vec![]),
        ]
    );
}

/// The recording rules and alerts, checked for what promtool does not check.
#[test]
fn rules_are_complete_and_select_the_scrape_job() {
    let pr = resource("PrometheusRule");
    let job = format!("job=\"{}\"", s(&resource("Service"), "metadata.name"));
    assert_eq!(s(&pr, "apiVersion"), "monitoring.coreos.com/v1");
    only_keys(&pr["spec"], "spec", &["groups"]);
    let recorded = recordings();
    let mut names = BTreeSet::new();
    let mut used = BTreeSet::new();
    for g in seq(&pr, "spec.groups") {
        only_keys(g, "group", &["name", "interval", "rules", "limit"]);
        let group = s(g, "name");
        assert!(names.insert(group.to_string()), "group names are unique");
        // A group records or alerts, not both (kube-prometheus' `*.rules`
        // groups): recording groups say how often they record.
        let records = seq(g, "rules").iter().filter(|r| r.get("record").is_some());
        if records.count() > 0 {
            assert!(group.ends_with(".rules"), "{group}: a recording group");
            assert!(at(g, "interval").as_str().is_some(), "{group}: interval");
            for r in seq(g, "rules") {
                // recordings() checked each one's name and expression.
                only_keys(r, "recording rule", &["record", "expr", "labels"]);
                let name = s(r, "record");
                assert!(names.insert(name.to_string()), "{name}: duplicate");
            }
            continue;
        }
        assert!(!group.ends_with(".rules"), "{group}: holds alerts");
        for r in seq(g, "rules") {
            only_keys(
                r,
                "rule",
                &[
                    "alert",
                    "expr",
                    "for",
                    "labels",
                    "annotations",
                    "keep_firing_for",
                ],
            );
            let name = s(r, "alert");
            assert!(names.insert(name.to_string()), "{name}: duplicate");
            let sev = s(r, "labels.severity");
            assert!(SEVERITIES.contains(&sev), "{name}: severity {sev}");
            let summary = s(r, "annotations.summary");
            let description = s(r, "annotations.description");
            assert!(
                !summary.is_empty() && !summary.contains('\n'),
                "{name}: summary"
            );
            assert!(
                description.len() > 150,
                "{name}: the description must tell the on-call person what to do"
            );
            let minutes: u64 = s(r, "for")
                .strip_suffix('m')
                .and_then(|m| m.parse().ok())
                .unwrap_or_else(|| panic!("{name}: `for` in minutes"));
            assert!(minutes >= 5, "{name}: `for: {minutes}m` flaps");
            // What the alert reads, through the recorded series it names.
            let expr = s(r, "expr");
            check_recorded_reads(name, expr, &recorded);
            let expr = with_recordings(expr, &recorded);
            for m in METRICS.iter().chain(&["up"]) {
                if expr.contains(&format!("{m}{{")) {
                    used.insert(*m);
                    assert!(
                        expr.contains(&format!("{m}{{{job}")),
                        "{name}: {m} must be selected with {job}"
                    );
                }
            }
        }
    }
    for rec in &recorded {
        assert!(
            rec.expr.contains(&format!("{{{job}}}")),
            "{}: must read {job}",
            rec.name
        );
    }
    for m in [
        "podscope_process_exits_total",
        "podscope_events_lost_total",
        "podscope_probe_attached",
        "podscope_cri_errors_total",
        "up",
    ] {
        assert!(used.contains(m), "no alert on {m}");
    }
}

/// spec of the PrometheusRule as a plain rules file; `annotations: false`
/// leaves the annotations out (for the unit tests, which would compare them).
fn rules_file(dir: &Path, annotations: bool) -> PathBuf {
    let mut spec = resource("PrometheusRule")["spec"].clone();
    if !annotations {
        for g in spec["groups"].as_sequence_mut().unwrap() {
            for r in g["rules"].as_sequence_mut().unwrap() {
                r.as_mapping_mut().unwrap().remove("annotations");
            }
        }
    }
    let p = dir.join("rules.yaml");
    fs::write(&p, serde_yaml::to_string(&spec).unwrap()).unwrap();
    p
}

#[test]
fn alert_rules_pass_promtool() {
    let test = "alert_rules_pass_promtool";
    let Some(promtool) = tool(test, "promtool") else {
        return;
    };
    let dir = scratch(test);
    let rules = rules_file(&dir, true);
    let o = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&rules));
    assert!(o.status.success(), "promtool check rules:\n{}", text(&o));

    // What each recording rule records, when each alert fires and when it
    // must not.
    rules_file(&dir, false);
    fs::copy(
        deploy_dir().join("tests/rules_test.yaml"),
        dir.join("rules_test.yaml"),
    )
    .unwrap();
    let o =
        run(Command::new(&promtool)
            .current_dir(&dir)
            .args(["test", "rules", "rules_test.yaml"]));
    assert!(o.status.success(), "promtool test rules:\n{}", text(&o));
    let _ = fs::remove_dir_all(dir);
}

/// Every alert has a unit test in tests/rules_test.yaml that expects it to
/// fire, and every recording rule one that asserts the series it records.
#[test]
fn every_rule_has_a_unit_test() {
    let tests = yaml("tests/rules_test.yaml");
    let tested: BTreeSet<&str> = seq(&tests, "tests")
        .iter()
        .filter(|t| t.get("alert_rule_test").is_some())
        .flat_map(|t| seq(t, "alert_rule_test"))
        .filter(|a| !seq(a, "exp_alerts").is_empty())
        .map(|a| s(a, "alertname"))
        .collect();
    // The names of the series promql_expr_test expects: what a recording
    // rule must be seen to produce.
    let asserted: BTreeSet<String> = seq(&tests, "tests")
        .iter()
        .filter(|t| t.get("promql_expr_test").is_some())
        .flat_map(|t| seq(t, "promql_expr_test"))
        .flat_map(|e| seq(e, "exp_samples"))
        .filter_map(|x| Some(s(x, "labels").split('{').next()?.trim().to_string()))
        .collect();
    for g in seq(&resource("PrometheusRule"), "spec.groups") {
        for r in seq(g, "rules") {
            if let Some(record) = r["record"].as_str() {
                assert!(
                    asserted.contains(record),
                    "{record} has no promql_expr_test in tests/rules_test.yaml that expects its series"
                );
                continue;
            }
            let name = s(r, "alert").to_string();
            assert!(
                tested.contains(name.as_str()),
                "{name} has no firing case in tests/rules_test.yaml"
            );
        }
    }
}

/// README.md's scrape config for Prometheus without the operator, with the
/// rules extracted as README.md says, is a valid Prometheus configuration.
#[test]
fn readme_scrape_config_passes_promtool() {
    let test = "readme_scrape_config_passes_promtool";
    let Some(promtool) = tool(test, "promtool") else {
        return;
    };
    let readme = read("README.md");
    let block = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split_once("```").map(|(code, _)| code))
        .find(|code| code.contains("scrape_configs:"))
        .expect("README.md has a scrape config");
    let mut config: Yaml = serde_yaml::from_str(block).expect("the scrape config is YAML");
    let job = &config["scrape_configs"][0];
    assert_eq!(
        s(job, "job_name"),
        "podscope",
        "the alerts select job=\"podscope\""
    );
    assert_eq!(job["honor_labels"], true);
    assert_eq!(s(job, "kubernetes_sd_configs.0.role"), "pod");
    assert_eq!(
        s(job, "kubernetes_sd_configs.0.namespaces.names.0"),
        "podscope"
    );
    let sets_node = seq(job, "relabel_configs").iter().any(|r| {
        r["target_label"] == "node" && s(r, "source_labels.0") == "__meta_kubernetes_pod_node_name"
    });
    assert!(sets_node, "the scrape config sets the node label");

    let dir = scratch(test);
    rules_file(&dir, true);
    let p = dir.join("prometheus.yml");
    let check = |config: &str| {
        fs::write(&p, format!("{config}rule_files:\n  - rules.yaml\n")).unwrap();
        run(Command::new(&promtool).arg("check").arg("config").arg(&p))
    };
    // promtool opens the token file, which exists only in a pod: point it
    // at a stand-in (the path itself is checked here).
    const TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    assert_eq!(s(job, "authorization.credentials_file"), TOKEN);
    assert_eq!(s(job, "scheme"), "https");
    let token = dir.join("token");
    fs::write(&token, "t").unwrap();
    let block = &block.replace(TOKEN, token.to_str().unwrap());
    config["scrape_configs"][0]["authorization"]["credentials_file"] =
        Yaml::from(token.to_str().unwrap());
    let mut o = check(block);
    if !o.status.success() && text(&o).contains("kubernetes_sd_configs not found") {
        // Debian builds Prometheus without Kubernetes service discovery (no
        // package has it): check everything else, with a static target in
        // its place. Said as PARTIAL, which `cargo xtask test` lists apart
        // from skips: the test ran, one tool's check of one section did not.
        let _ = writeln!(
            std::io::stderr(),
            "PARTIAL readme_scrape_config_passes_promtool: kubernetes_sd_configs checked by the assertions above, not by promtool (this promtool has no Kubernetes service discovery)"
        );
        let job = &mut config["scrape_configs"][0];
        job.as_mapping_mut()
            .unwrap()
            .remove("kubernetes_sd_configs");
        job["static_configs"] = serde_yaml::from_str("[{targets: ['127.0.0.1:9811']}]").unwrap();
        o = check(&serde_yaml::to_string(&config).unwrap());
    }
    assert!(o.status.success(), "promtool check config:\n{}", text(&o));
    let _ = fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// The Grafana dashboard

/// Every panel, rows' nested panels included.
fn panels(d: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// Every PromQL expression: panel targets and query variables' selectors.
fn dashboard_queries(d: &Json) -> Vec<(String, String)> {
    let mut q = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            q.push((
                title.to_string(),
                t["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let def = v["definition"].as_str().unwrap();
            // label_values(SELECTOR, label): the selector is PromQL.
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel.to_string())
                .unwrap_or_else(|| panic!("variable query `{def}`"));
            q.push((format!("variable {}", v["name"]), inner));
        }
    }
    q
}

fn variable_names(d: &Json) -> BTreeSet<String> {
    d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// `$name` and `${name}` references in a query.
fn references(q: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = q;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let body = rest.strip_prefix('{').unwrap_or(rest);
        let name: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.insert(name);
    }
    out
}

#[test]
fn dashboard_is_a_grafana_dashboard_over_the_contract_metrics() {
    let d = json("grafana/podscope.json");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36, "schemaVersion");
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    let vars = variable_names(&d);
    for v in ["datasource", "namespace", "pod"] {
        assert!(vars.contains(v), "variable {v}");
    }
    let ds_var = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "datasource")
        .unwrap();
    assert_eq!(ds_var["type"], "datasource");
    assert_eq!(ds_var["query"], "prometheus");

    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: id"
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && g["h"].as_u64().unwrap() > 0,
            "{title}: gridPos"
        );
        let ty = p["type"].as_str().unwrap();
        assert!(
            [
                "row",
                "timeseries",
                "stat",
                "table",
                "bargauge",
                "gauge",
                "state-timeline"
            ]
            .contains(&ty),
            "{title}: panel type {ty}"
        );
        if ty == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(refs.insert(t["refId"].as_str().unwrap()), "{title}: refId");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    // What the panels read in the end: raw series, or recorded ones through
    // the recording rules' expressions.
    let recorded = recordings();
    let all: String = dashboard_queries(&d)
        .into_iter()
        .map(|(title, q)| {
            check_recorded_reads(&title, &q, &recorded);
            with_recordings(&q, &recorded)
        })
        .collect::<Vec<_>>()
        .join("\n");
    for (m, what) in [
        ("podscope_process_exits_total", "exits per pod"),
        ("outcome=\"signaled\"", "signaled exits"),
        ("podscope_events_lost_total", "lost events"),
        ("podscope_probe_attached", "probes attached"),
        ("podscope_tracked_containers", "tracked containers"),
        ("podscope_cri_errors_total", "CRI errors"),
    ] {
        assert!(all.contains(m), "no panel for {what} ({m})");
    }
    for q in dashboard_queries(&d) {
        for r in references(&q.1) {
            assert!(
                vars.contains(&r) || r.starts_with("__"),
                "{}: ${r} is not a dashboard variable",
                q.0
            );
        }
    }
    // A legend names only labels the query's outer aggregation keeps.
    for p in panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let (Some(expr), Some(legend)) = (t["expr"].as_str(), t["legendFormat"].as_str())
            else {
                continue;
            };
            let Some(by) = outer_by(expr) else {
                continue;
            };
            for l in legend
                .split("{{")
                .skip(1)
                .filter_map(|x| x.split_once("}}"))
            {
                assert!(
                    by.contains(&l.0.trim()),
                    "{}: the legend names {{{{{}}}}}, which `by ({})` drops",
                    p["title"],
                    l.0,
                    by.join(", ")
                );
            }
        }
    }
}

/// The labels of `AGG by (…) (…)` at the head of a query (after `topk(N, `
/// or `sort_desc(`), if it starts so.
fn outer_by(q: &str) -> Option<Vec<&str>> {
    let mut q = q.trim();
    for wrapper in ["sort_desc(", "sort(", "topk(", "bottomk("] {
        if let Some(rest) = q.strip_prefix(wrapper) {
            q = rest.split_once(", ").map_or(rest, |(k, r)| {
                if k.chars().all(|c| c.is_ascii_digit()) {
                    r
                } else {
                    rest
                }
            });
        }
    }
    let (agg, rest) = q.split_once(" by (")?;
    if !["sum", "max", "min", "avg", "count"].contains(&agg) {
        return None;
    }
    Some(rest.split_once(')')?.0.split(", ").collect())
}

/// A dashboard query with Grafana's variables replaced by what they expand
/// to: every selectable one by `.*` (All), the panels' step by their
/// minimum interval (1m, the recording rules' interval).
fn expand(d: &Json, q: &str) -> String {
    let mut q = q.to_string();
    for (from, to) in [
        ("$__rate_interval", "2m"),
        ("$__interval", "1m"),
        ("$__range", "3h"),
        ("${job}", "podscope"),
        ("$job", "podscope"),
    ] {
        q = q.replace(from, to);
    }
    for v in variable_names(d) {
        q = q
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    q
}

#[test]
fn dashboard_queries_parse() {
    let test = "dashboard_queries_parse";
    let Some(promtool) = tool(test, "promtool") else {
        return;
    };
    let d = json("grafana/podscope.json");
    let rules: Vec<Yaml> = dashboard_queries(&d)
        .iter()
        .enumerate()
        .map(|(i, (_, q))| {
            let mut m = serde_yaml::Mapping::new();
            m.insert("record".into(), format!("dashboard:query_{i}").into());
            m.insert("expr".into(), expand(&d, q).into());
            Yaml::Mapping(m)
        })
        .collect();
    let mut group = serde_yaml::Mapping::new();
    group.insert("name".into(), "dashboard".into());
    group.insert("rules".into(), Yaml::Sequence(rules));
    let mut file = serde_yaml::Mapping::new();
    file.insert("groups".into(), Yaml::Sequence(vec![Yaml::Mapping(group)]));
    let dir = scratch(test);
    let p = dir.join("dashboard.yaml");
    fs::write(&p, serde_yaml::to_string(&file).unwrap()).unwrap();
    let o = run(Command::new(&promtool).arg("check").arg("rules").arg(&p));
    assert!(
        o.status.success(),
        "a dashboard query does not parse:\n{}\n{}",
        text(&o),
        fs::read_to_string(&p).unwrap()
    );
    let _ = fs::remove_dir_all(dir);
}

/// One agent's scrape: a series of each metric the dashboard reads, raw or
/// through a recording rule, as (metric, its own labels, values): counters
/// rising, gauges set. Each carries the scrape's labels too, and the
/// workload's after the first `WORKLOAD_SERIES` of them.
const DASHBOARD_INPUT: &[(&str, &str, &str)] = &[
    ("up", "", "1x40"),
    (
        "podscope_build_info",
        r#"version="0.1.0", kernel="6.18.0""#,
        "1x40",
    ),
    ("podscope_tracked_containers", "", "12x40"),
    (
        "podscope_probe_attached",
        r#"probe="exits", attach_type="raw_tp""#,
        "1x40",
    ),
    ("podscope_events_total", r#"source="exits""#, "0+60x40"),
    ("podscope_events_lost_total", r#"source="exits""#, "0+1x40"),
    ("podscope_series_refused_total", "", "0+1x40"),
    ("podscope_cri_errors_total", "", "0+1x40"),
    // Per workload from here.
    ("podscope_process_exits_total", r#"outcome="ok""#, "0+5x40"),
    (
        "podscope_process_exits_total",
        r#"outcome="error""#,
        "0+1x40",
    ),
    (
        "podscope_process_exits_total",
        r#"outcome="signaled""#,
        "0+1x40",
    ),
    (
        "podscope_container_terminations_total",
        r#"reason="OOMKilled""#,
        "0+1x40",
    ),
    (
        "podscope_container_restarts_total",
        r#"trigger="liveness_probe""#,
        "0+1x40",
    ),
    ("podscope_oom_kills_total", r#"scope="container""#, "0+1x40"),
    (
        "podscope_container_background_deaths_total",
        r#"cause="crashed""#,
        "0+1x40",
    ),
    (
        "podscope_container_respawns_total",
        r#"command="worker""#,
        "0+1x40",
    ),
    (
        "podscope_container_runtime_contradictions_total",
        r#"reason="Error", runtime_reason="OOMKilled""#,
        "0+1x40",
    ),
];
const WORKLOAD_SERIES: usize = 8;

/// Every panel's and variable's query returns data when an agent's series
/// are there, with every variable on All: promtool evaluates the recording
/// rules on the raw series first, so a panel that names a series nobody
/// records, or matches a recorded series on a label it does not keep (job,
/// instance), comes back empty and fails here.
#[test]
fn dashboard_queries_return_data_through_the_rules() {
    let test = "dashboard_queries_return_data_through_the_rules";
    let Some(promtool) = tool(test, "promtool") else {
        return;
    };
    let d = json("grafana/podscope.json");
    let recorded = recordings();
    let have: BTreeSet<&str> = DASHBOARD_INPUT.iter().map(|(m, _, _)| *m).collect();
    for (title, q) in dashboard_queries(&d) {
        for (m, _) in selectors(&with_recordings(&q, &recorded)) {
            assert!(
                m.contains(':') || have.contains(m.as_str()),
                "{title}: DASHBOARD_INPUT has no series of {m}"
            );
        }
    }
    let map = |pairs: Vec<(&str, Yaml)>| {
        Yaml::Mapping(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    };
    let input = DASHBOARD_INPUT
        .iter()
        .enumerate()
        .map(|(i, (metric, labels, values))| {
            let mut all = vec![r#"job="podscope", instance="198.18.0.1:9811", node="n1""#];
            if i >= WORKLOAD_SERIES {
                all.push(r#"namespace="shop", pod="cart-1", container="app""#);
            }
            all.extend((!labels.is_empty()).then_some(*labels));
            let series = format!("{metric}{{{}}}", all.join(", "));
            map(vec![
                ("series", series.into()),
                ("values", (*values).into()),
            ])
        })
        .collect();
    let exprs = dashboard_queries(&d)
        .iter()
        .map(|(_, q)| {
            map(vec![
                ("expr", format!("absent({})", expand(&d, q)).into()),
                ("eval_time", "30m".into()),
                ("exp_samples", Yaml::Sequence(vec![])),
            ])
        })
        .collect();
    let tests = map(vec![
        ("rule_files", Yaml::Sequence(vec!["rules.yaml".into()])),
        ("evaluation_interval", "1m".into()),
        (
            "tests",
            Yaml::Sequence(vec![map(vec![
                ("interval", "1m".into()),
                ("input_series", Yaml::Sequence(input)),
                ("promql_expr_test", Yaml::Sequence(exprs)),
            ])]),
        ),
    ]);
    let dir = scratch(test);
    rules_file(&dir, false);
    let p = dir.join("dashboard_test.yaml");
    fs::write(&p, serde_yaml::to_string(&tests).unwrap()).unwrap();
    let o = run(Command::new(&promtool).current_dir(&dir).args([
        "test",
        "rules",
        "dashboard_test.yaml",
    ]));
    assert!(
        o.status.success(),
        "a dashboard query returns nothing (absent(…) answered):\n{}",
        text(&o)
    );
    let _ = fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// YAML lint, the image, and the agent's side of the contract

#[test]
fn yaml_is_lint_free() {
    let test = "yaml_is_lint_free";
    let Some(yamllint) = tool(test, "yamllint") else {
        return;
    };
    let o = run(Command::new(&yamllint).current_dir(deploy_dir()).args([
        "--strict",
        "--format",
        "parsable",
        "-c",
        ".yamllint",
        ".",
    ]));
    assert!(o.status.success(), "yamllint:\n{}", text(&o));
    // It must have looked at the files: a broken one is reported.
    let dir = scratch(test);
    fs::write(dir.join("bad.yaml"), "a: 1\na: 2\n").unwrap();
    let o = run(Command::new(&yamllint)
        .args(["--strict", "-c"])
        .arg(deploy_dir().join(".yamllint"))
        .arg(dir.join("bad.yaml")));
    assert!(!o.status.success(), "yamllint accepts duplicate keys?");
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn dockerfile_builds_the_agent_with_the_projects_setup() {
    let df = read("Dockerfile");
    // Instructions, with line continuations joined.
    let joined = df.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .copied()
        .collect();
    assert!(froms.len() >= 2, "multi-stage");
    assert!(
        froms[0].contains("rust:") && froms[0].contains("bookworm"),
        "{}",
        froms[0]
    );
    // Multi-arch: the builder runs once, on the build machine's platform,
    // and cross-builds every architecture's static binary; each runtime
    // stage takes its own.
    assert!(
        froms[0].starts_with("FROM --platform=$BUILDPLATFORM "),
        "{}",
        froms[0]
    );
    let last = froms.last().unwrap();
    // Debian's iptables package: the agent runs iptables-save to read
    // kube-proxy's rules.
    assert!(last.contains("debian:bookworm-slim"), "{last}");
    assert!(joined.contains("PODSCOPE_SETUP_MINIMAL=1"));
    assert!(joined.contains("cargo xtask dist --out /out"));
    let last_stage = &joined[joined.rfind("\nFROM ").unwrap()..];
    assert!(last_stage.contains(&format!("ENTRYPOINT [\"{BINARY}\"]")));
    assert!(last_stage.contains("CMD [\"agent\"]"));
    assert!(last_stage.contains("ARG TARGETARCH"));
    // The names `cargo xtask dist` gives its binaries (xtask/src/dist.rs).
    assert!(
        last_stage.contains(&format!(
            "COPY --from=builder /out/podscope-linux-${{TARGETARCH}} {BINARY}"
        )),
        "the runtime stage takes its architecture's binary"
    );
    assert!(
        last_stage.contains(STATE_DIR),
        "the state directory exists in the image"
    );
    assert!(last_stage.contains(&format!("EXPOSE {PORT}")));
    assert!(
        last_stage.contains("apt-get install -y --no-install-recommends iptables"),
        "the runtime image has iptables-save"
    );

    let ignore = fs::read_to_string(deploy_dir().join("../.dockerignore"))
        .expect("a .dockerignore at the repository root");
    let entries: Vec<&str> = ignore
        .lines()
        .map(|l| l.trim().trim_end_matches('/'))
        .collect();
    for e in ["target", ".git"] {
        assert!(
            entries.iter().any(|l| l.trim_start_matches('/') == e),
            ".dockerignore lacks {e}"
        );
    }
}

/// The names the deployment relies on must be the ones the agent implements.
#[test]
fn the_agent_implements_what_the_deployment_uses() {
    let test = "the_agent_implements_what_the_deployment_uses";
    let mut src = String::new();
    let mut stack = vec![deploy_dir().join("../agent/src")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                src.push_str(&fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    // The daemon exists: a source that lost it fails here rather than
    // passing without checking the names below.
    assert!(
        src.contains("PODSCOPE_LISTEN"),
        "{test}: agent/src does not read PODSCOPE_LISTEN (the DaemonSet sets it)"
    );
    let ds = resource("DaemonSet");
    let c = container(&ds);
    for k in env_map(c).keys() {
        assert!(
            src.contains(&format!("\"{k}\"")),
            "the agent does not read {k}"
        );
    }
    for a in seq(c, "args").iter().skip(1) {
        let flag = a.as_str().unwrap().split('=').next().unwrap();
        let long = flag.trim_start_matches("--");
        assert!(
            src.contains(&format!("\"{long}\"")) || src.contains(&long.replace('-', "_")),
            "the agent has no {flag}"
        );
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert!(
            src.contains(&format!("\"{path}\"")),
            "the agent serves no {path}"
        );
    }
    // Metrics may be registered under a prefix and without the _total suffix.
    for m in METRICS {
        let bare = m.trim_start_matches("podscope_").trim_end_matches("_total");
        assert!(src.contains(bare), "the agent exports no {m}");
    }
    // And every podscope metric a recording rule, an alert or a panel
    // reads is registered by that name (`registry.register("oom_kills", …)`).
    let mut read: Vec<String> = dashboard_queries(&json("grafana/podscope.json"))
        .into_iter()
        .map(|(_, q)| q)
        .collect();
    for g in seq(&resource("PrometheusRule"), "spec.groups") {
        read.extend(seq(g, "rules").iter().map(|r| s(r, "expr").to_string()));
    }
    for (m, _) in read.iter().flat_map(|q| selectors(q)) {
        let Some(bare) = m.strip_prefix("podscope_") else {
            continue;
        };
        let bare = bare.strip_suffix("_total").unwrap_or(bare);
        assert!(
            src.contains(&format!("\"{bare}\"")),
            "the agent registers no {m} (\"{bare}\" in agent/src)"
        );
    }
}

/// The real agent, started with the DaemonSet's arguments and environment
/// (only the listen address, state directory, API socket and node name
/// adapted to this machine), accepts them, logs JSON, serves /healthz,
/// /readyz and /metrics with every metric the alerts and the dashboard use,
/// serves the node-wide API on its 0600 socket and not on the port, and
/// exits 0 on SIGTERM well within terminationGracePeriodSeconds, removing
/// the socket.
#[test]
fn the_agent_runs_with_the_daemonsets_settings() {
    use std::{
        io::Read,
        net::{TcpListener, TcpStream},
        process::Stdio,
        time::{Duration, Instant},
    };
    let test = "the_agent_runs_with_the_daemonsets_settings";
    let root = fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    });
    if !root {
        assert!(
            !required(),
            "{test}: needs root, and PODSCOPE_REQUIRE_KERNEL_TESTS=1"
        );
        skipped(test, "needs root to load the agent's eBPF programs");
        return;
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let bin = deploy_dir().join(format!("../target/{profile}/podscope"));
    if !bin.exists() {
        let why = format!("{} is not built (cargo build -p podscope)", bin.display());
        assert!(
            !required(),
            "{test}: {why}, and PODSCOPE_REQUIRE_KERNEL_TESTS=1"
        );
        skipped(test, &why);
        return;
    }
    // A plain HTTP/1.0 GET on a stream: (status, body).
    fn exchange(mut s: impl Read + Write, path: &str) -> Option<(u16, String)> {
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let (head, body) = raw.split_once("\r\n\r\n")?;
        Some((
            head.split_whitespace().nth(1)?.parse().ok()?,
            body.to_string(),
        ))
    }
    let get = |port: u16, path: &str| -> Option<(u16, String)> {
        let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        exchange(s, path)
    };

    let ds = resource("DaemonSet");
    let c = container(&ds);
    let dir = scratch(test);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(&bin);
    cmd.args(seq(c, "args").iter().map(|a| a.as_str().unwrap()));
    for (k, _) in env::vars_os() {
        if k.to_string_lossy().starts_with("PODSCOPE_") {
            cmd.env_remove(k);
        }
    }
    for (k, e) in env_map(c) {
        let v = match k.as_str() {
            "PODSCOPE_LISTEN" => format!("127.0.0.1:{port}"),
            "PODSCOPE_STATE_DIR" => dir.join("state").display().to_string(),
            "PODSCOPE_API_SOCKET" => dir.join("run/api.sock").display().to_string(),
            "PODSCOPE_NODE_NAME" => "deploy-test-node".to_string(),
            _ => s(&e, "value").to_string(),
        };
        cmd.env(k, v);
    }
    let log = fs::File::create(dir.join("agent.log")).unwrap();
    let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
    // Ends the agent whatever happens below.
    struct Agent(std::process::Child);
    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut agent = Agent(child);
    let log = || fs::read_to_string(dir.join("agent.log")).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(30);
    while get(port, "/healthz").map(|r| r.0) != Some(200) {
        if let Ok(Some(st)) = agent.0.try_wait() {
            panic!(
                "the agent exited ({st}) with the DaemonSet's settings:\n{}",
                log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no /healthz after 30 s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Ready needs the CRI, which this machine may not run: it must answer.
    let ready = get(port, "/readyz").map(|r| r.0);
    assert!(
        matches!(ready, Some(200 | 503)),
        "/readyz answered {ready:?}"
    );
    // Every metric the alerts and the dashboard use, but per-pod exits
    // (those need pods: the daemon's own end-to-end test has them). The
    // event counters appear with the first events, so make a few.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let _ = Command::new("true").status();
        let (status, metrics) = get(port, "/metrics").expect("/metrics");
        assert_eq!(status, 200);
        let missing: Vec<&str> = METRICS
            .iter()
            .copied()
            .filter(|m| *m != "podscope_process_exits_total")
            .filter(|m| {
                let bare = m.trim_end_matches("_total");
                !metrics.contains(&format!("# TYPE {m} "))
                    && !metrics.contains(&format!("# TYPE {bare} "))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics lacks {missing:?} after 15 s:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // The node-wide API: on the socket, not on the port.
    let socket = dir.join("run/api.sock");
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(&socket)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", socket.display(), log()))
    };
    assert_eq!(mode, 0o600, "the API socket is root's alone");
    let unix_get = |path: &str| -> Option<(u16, String)> {
        let s = std::os::unix::net::UnixStream::connect(&socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        exchange(s, path)
    };
    assert_eq!(
        unix_get("/api/v1/terminations").map(|r| r.0),
        Some(200),
        "the API answers on its socket"
    );
    for path in ["/api/v1/terminations", "/api/v1/events"] {
        assert_eq!(
            get(port, path).map(|r| r.0),
            Some(404),
            "{path} must not be served on the port"
        );
    }

    let stopped = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status();
    let grace = at(&ds, "spec.template.spec.terminationGracePeriodSeconds")
        .as_u64()
        .unwrap();
    let status = loop {
        if let Some(st) = agent.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(grace),
            "the agent outlived terminationGracePeriodSeconds ({grace} s)"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit on SIGTERM: {status}\n{}", log());
    assert!(!socket.exists(), "the API socket is removed on SIGTERM");
    // PODSCOPE_LOG_FORMAT=json: every log line is a JSON object.
    let log = log();
    assert!(!log.trim().is_empty(), "the agent logged nothing");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Json = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(v.is_object(), "{line}");
    }
    drop(agent);
    let _ = fs::remove_dir_all(dir);
}
