//! The test node plays kube-proxy in iptables mode (the default; nftables
//! mode is [`crate::nftables`], chosen with [`set_mode`]): Services and the ready
//! pods their selectors match become the rules kube-proxy writes, with its
//! chains (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*, KUBE-MARK-MASQ,
//! KUBE-POSTROUTING, KUBE-NODEPORTS), its comments, its chain-name hashing
//! and its statistic ladder, and the filter table's REJECT for a Service
//! without endpoints, all inside the node's network namespace. The layout
//! follows kubernetes/pkg/proxy/iptables/proxier.go (1.28+) with
//! `--cluster-cidr` set to the pod range.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use sha2::{Digest, Sha256};

use crate::{
    error::{IoContext, Result, run},
    manifest::Pod,
    netns::in_node,
    paths,
    process::NodeLock,
    service::{self, Service},
    status::{self, Phase},
};

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";

/// A ready pod that may back Services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
}

/// One Service port's endpoints (`ip:port`, sorted), as kube-proxy sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortRules {
    /// `namespace/name:port-name` (no `:` part for an unnamed port).
    pub port_name: String,
    pub protocol: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// A NodePort Service's port on every node address.
    pub node_port: Option<u16>,
    pub endpoints: Vec<String>,
}

/// kube-proxy's hash: the first 16 characters of base32(sha256(s)).
fn hash16(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    base32(&digest)[..16].to_string()
}

/// RFC 4648 base32 (what Go's base32.StdEncoding produces, padding aside).
pub(crate) fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let (mut buf, mut bits) = (0u64, 0u32);
    for &b in data {
        buf = (buf << 8) | u64::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// `KUBE-SVC-` + hash(servicePortName + protocol), protocol in lower case.
pub fn service_chain(port_name: &str, protocol: &str) -> String {
    format!(
        "KUBE-SVC-{}",
        hash16(&format!("{port_name}{}", protocol.to_lowercase()))
    )
}

/// `KUBE-EXT-` + the KUBE-SVC- chain's hash: external traffic (NodePorts).
pub fn external_chain(port_name: &str, protocol: &str) -> String {
    service_chain(port_name, protocol).replacen("KUBE-SVC-", "KUBE-EXT-", 1)
}

/// `KUBE-SEP-` + hash(servicePortName + protocol + endpoint).
pub fn endpoint_chain(port_name: &str, protocol: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{port_name}{}{endpoint}", protocol.to_lowercase()))
    )
}

/// The Service ports and their endpoints, from Services and ready pods.
pub fn plan(services: &[Service], pods: &[ReadyPod]) -> Vec<ServicePortRules> {
    let mut out = vec![];
    for svc in services {
        let Some(cluster_ip) = svc.spec.cluster_ip else {
            continue;
        };
        let backing: Vec<&ReadyPod> = if svc.spec.selector.is_empty() {
            vec![]
        } else {
            pods.iter()
                .filter(|p| {
                    p.namespace == svc.namespace()
                        && svc
                            .spec
                            .selector
                            .iter()
                            .all(|(k, v)| p.labels.get(k) == Some(v))
                })
                .collect()
        };
        for port in &svc.spec.ports {
            let port_name = match &port.name {
                Some(n) => format!("{}/{}:{n}", svc.namespace(), svc.name()),
                None => format!("{}/{}", svc.namespace(), svc.name()),
            };
            let mut endpoints: Vec<String> = backing
                .iter()
                .map(|p| format!("{}:{}", p.ip, port.target_port()))
                .collect();
            endpoints.sort();
            endpoints.dedup();
            out.push(ServicePortRules {
                port_name,
                protocol: port.protocol().to_string(),
                cluster_ip,
                port: port.port,
                node_port: port.node_port.filter(|_| svc.is_node_port()),
                endpoints,
            });
        }
    }
    out
}

/// kube-proxy's probability for the i-th of n remaining endpoints (`%0.10f`).
fn probability(remaining: usize) -> String {
    format!("{:.10}", 1.0 / remaining as f64)
}

/// The `iptables-restore` input: nat and filter tables, kube-proxy's chains
/// only (`--noflush` leaves every other chain alone). `stale` are KUBE-SVC/SEP
/// chains that exist but are no longer wanted: flushed and deleted.
pub fn render(ports: &[ServicePortRules], stale: &BTreeSet<String>) -> String {
    let mut chains = vec![];
    let mut rules = String::new();
    let masq = "-j KUBE-MARK-MASQ";
    for sp in ports.iter().filter(|p| !p.endpoints.is_empty()) {
        let proto = sp.protocol.to_lowercase();
        let svc_chain = service_chain(&sp.port_name, &sp.protocol);
        let dst = format!(
            "-m {proto} -p {proto} -d {}/32 --dport {}",
            sp.cluster_ip, sp.port
        );
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" {dst} -j {svc_chain}",
            sp.port_name
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{} cluster IP\" {dst} ! -s {} {masq}",
            sp.port_name,
            paths::POD_SUBNET
        );
        let n = sp.endpoints.len();
        let mut sep_rules = String::new();
        for (i, ep) in sp.endpoints.iter().enumerate() {
            let sep = endpoint_chain(&sp.port_name, &sp.protocol, ep);
            let ladder = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {}",
                    probability(n - i)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{} -> {ep}\"{ladder} -j {sep}",
                sp.port_name
            );
            let ep_ip = ep.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(ep);
            let _ = writeln!(
                sep_rules,
                "-A {sep} -m comment --comment {} -s {ep_ip}/32 {masq}",
                sp.port_name
            );
            let _ = writeln!(
                sep_rules,
                "-A {sep} -m comment --comment {} -m {proto} -p {proto} -j DNAT --to-destination {ep}",
                sp.port_name
            );
            chains.push(sep);
        }
        rules.push_str(&sep_rules);
        // NodePorts (externalTrafficPolicy Cluster): KUBE-NODEPORTS sends
        // them to KUBE-EXT, which marks them for masquerade and continues
        // into the Service chain.
        if let Some(np) = sp.node_port {
            let ext = external_chain(&sp.port_name, &sp.protocol);
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS -m comment --comment {} -m {proto} -p {proto} --dport {np} -j {ext}",
                sp.port_name
            );
            let _ = writeln!(
                rules,
                "-A {ext} -m comment --comment \"masquerade traffic for {} external destinations\" {masq}",
                sp.port_name
            );
            let _ = writeln!(rules, "-A {ext} -j {svc_chain}");
            chains.push(ext);
        }
        chains.push(svc_chain);
    }
    let mut out = String::from("*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-NODEPORTS",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    chains.sort();
    for c in chains.iter().chain(stale.iter()) {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    let _ = writeln!(
        out,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(out, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    let _ = writeln!(
        out,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    let _ = writeln!(out, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    out.push_str(&rules);
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
    for c in stale {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n*filter\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for sp in ports.iter().filter(|p| p.endpoints.is_empty()) {
        let proto = sp.protocol.to_lowercase();
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} has no endpoints\" -m {proto} -p {proto} -d {}/32 --dport {} -j REJECT",
            sp.port_name, sp.cluster_ip, sp.port
        );
        if let Some(np) = sp.node_port {
            let _ = writeln!(
                out,
                "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{} has no endpoints\" -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j REJECT",
                sp.port_name
            );
        }
    }
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
    );
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    out.push_str("COMMIT\n");
    out
}

/// The jumps from the built-in chains into kube-proxy's, as kube-proxy
/// ensures them: (table, chain, only new connections, comment, target).
const JUMPS: &[(&str, &str, bool, &str, &str)] = &[
    (
        "filter",
        "INPUT",
        true,
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "INPUT",
        false,
        "kubernetes health check service ports",
        "KUBE-NODEPORTS",
    ),
    (
        "filter",
        "INPUT",
        true,
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        true,
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "FORWARD",
        false,
        "kubernetes forwarding rules",
        "KUBE-FORWARD",
    ),
    (
        "filter",
        "FORWARD",
        true,
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        true,
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        true,
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "OUTPUT",
        true,
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "OUTPUT",
        false,
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "PREROUTING",
        false,
        "kubernetes service portals",
        "KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        false,
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
    ),
];

/// A jump's match and target, as `iptables` arguments.
fn jump_rule(new_only: bool, comment: &'static str, target: &'static str) -> Vec<&'static str> {
    let mut rule = vec![];
    if new_only {
        rule.extend(["-m", "conntrack", "--ctstate", "NEW"]);
    }
    rule.extend(["-m", "comment", "--comment", comment, "-j", target]);
    rule
}

/// How long a terminating pod's endpoint outlives the start of its
/// termination on this node (`podscope-testnode endpoint-delay`; 0 unless set).
pub fn endpoint_delay() -> std::time::Duration {
    std::fs::read_to_string(paths::endpoint_delay())
        .ok()
        .and_then(|s| humantime::parse_duration(s.trim()).ok())
        .unwrap_or_default()
}

/// Sets the endpoint propagation delay.
pub fn set_endpoint_delay(d: std::time::Duration) -> Result<()> {
    let file = paths::endpoint_delay();
    std::fs::write(&file, humantime::format_duration(d).to_string())
        .ctx(|| format!("cannot write {}", file.display()))
}

/// Whether a terminating pod is still an endpoint: in a cluster the
/// EndpointSlice change takes time to reach kube-proxy, and until then the
/// pod keeps receiving new connections, even after its SIGTERM.
fn still_propagating(st: &status::PodStatus, delay: std::time::Duration) -> bool {
    st.phase == Phase::Terminating
        && st
            .terminating_since
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .is_some_and(|since| since + delay > std::time::SystemTime::now())
}

/// The pods that can back a Service: running, every container running and
/// ready (readiness and startup probes passing), with an IP; and
/// terminating pods until the endpoint propagation delay has passed.
pub fn ready_pods() -> Vec<ReadyPod> {
    let mut out = vec![];
    let delay = endpoint_delay();
    let Ok(rd) = std::fs::read_dir(paths::manifests_dir()) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        // Deletion markers too: a pod being deleted until its endpoint goes.
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.ends_with(".yaml") || name.ends_with(".yaml.deleted")) {
            continue;
        }
        let Ok(pod) = Pod::from_file(&p) else {
            continue;
        };
        let Ok(Some(st)) = status::read(pod.namespace(), pod.name()) else {
            continue;
        };
        let ready = (st.phase == Phase::Running
            && !st.containers.is_empty()
            && st
                .containers
                .iter()
                .all(|c| c.state == "running" && c.ready))
            || still_propagating(&st, delay);
        let ip = st.pod_ip.as_deref().and_then(|s| s.parse().ok());
        if let (true, Some(ip)) = (ready, ip) {
            out.push(ReadyPod {
                namespace: pod.namespace().to_string(),
                name: pod.name().to_string(),
                ip,
                labels: pod.metadata.labels.clone(),
            });
        }
    }
    out
}

/// KUBE-SVC-/KUBE-SEP-/KUBE-EXT- chains that exist in the node's nat table.
fn existing_chains() -> Result<BTreeSet<String>> {
    let text = run(in_node("iptables-save").args(["-t", "nat"]))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| {
            ["KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-"]
                .iter()
                .any(|p| c.starts_with(p))
        })
        .map(str::to_string)
        .collect())
}

fn ensure_jumps() -> Result<()> {
    for (table, chain, new_only, comment, target) in JUMPS {
        let rule = jump_rule(*new_only, comment, target);
        let present = in_node("iptables")
            .args(["-w", "-t", table, "-C", chain])
            .args(&rule)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            run(in_node("iptables")
                .args(["-w", "-t", table, "-I", chain])
                .args(&rule))?;
        }
    }
    Ok(())
}

fn restore(text: &str) -> Result<()> {
    crate::netns::feed_in_node("iptables-restore", &["-w", "--noflush"], text)
}

/// A route for the Service range, as a node's default route would take it: a
/// packet to a cluster IP that no DNAT rewrote then reaches the FORWARD chain
/// (and its REJECT) instead of failing routing. It points into the bridge
/// (nothing answers there, and nothing leaves the namespace); ICMP redirects
/// are turned off in the node's namespace, as the kernel would otherwise
/// answer a pod's packet with a redirect and rate-limit the REJECT's
/// port-unreachable behind it.
fn ensure_service_route() {
    // Through `ip netns exec`: /proc/sys/net shows the caller's namespace.
    for key in ["all", paths::BRIDGE] {
        let _ =
            run(in_node("sysctl").args(["-qw", &format!("net.ipv4.conf.{key}.send_redirects=0")]));
    }
    let _ = run(Command::new("ip").args([
        "-n",
        paths::NETNS,
        "route",
        "replace",
        paths::SERVICE_SUBNET,
        "dev",
        paths::BRIDGE,
    ]));
}

/// The rules for `n` synthetic Services of one port and two endpoints each,
/// in the Service range (198.19.0.0/16) and pod range (198.18.0.0/16): what
/// a node of that size makes kube-proxy write (the rules-read benchmark).
pub fn render_synthetic(mode: ProxyMode, n: u32) -> String {
    let ports: Vec<ServicePortRules> = (0..n)
        .map(|i| {
            let ep = |k: u32| {
                let a = 2 * i + k;
                format!("198.18.{}.{}:8080", 1 + a / 250, 1 + a % 250)
            };
            ServicePortRules {
                port_name: format!("bench/svc-{i}:http"),
                protocol: "TCP".into(),
                cluster_ip: Ipv4Addr::new(198, 19, (1 + i / 250) as u8, (1 + i % 250) as u8),
                port: 80,
                node_port: None,
                endpoints: vec![ep(0), ep(1)],
            }
        })
        .collect();
    match mode {
        ProxyMode::Iptables => render(&ports, &BTreeSet::new()),
        ProxyMode::Nftables => crate::nftables::render(&ports),
    }
}

/// Which of kube-proxy's modes the node plays (`node up --proxy-mode`,
/// `node proxy-mode`); iptables unless set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    Iptables,
    Nftables,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
        }
    }
}

/// The mode the node plays now.
pub fn mode() -> ProxyMode {
    match std::fs::read_to_string(paths::kube_proxy_mode()) {
        Ok(m) if m.trim() == "nftables" => ProxyMode::Nftables,
        _ => ProxyMode::Iptables,
    }
}

/// Switches the node to `mode`, as a kube-proxy restarted with another
/// `--proxy-mode` does: the other mode's rules are removed (kube-proxy's
/// cleanup of leftovers) and the Services are written in the new one.
pub fn set_mode(mode: ProxyMode) -> Result<()> {
    {
        let _lock = NodeLock::acquire_at(&paths::kube_proxy_lock())?;
        let file = paths::kube_proxy_mode();
        std::fs::write(&file, mode.as_str()).ctx(|| format!("cannot write {}", file.display()))?;
        match mode {
            ProxyMode::Nftables => remove_iptables_rules()?,
            ProxyMode::Iptables => crate::nftables::remove()?,
        }
        // The next sync writes everything anew.
        let _ = std::fs::remove_file(paths::kube_proxy_rules());
    }
    sync().map(|_| ())
}

/// Removes kube-proxy's iptables chains and the jumps into them.
fn remove_iptables_rules() -> Result<()> {
    for (table, chain, new_only, comment, target) in JUMPS {
        let _ = in_node("iptables")
            .args(["-w", "-t", table, "-D", chain])
            .args(jump_rule(*new_only, comment, target))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let saved = run(&mut in_node("iptables-save"))?;
    let mut text = String::new();
    let mut table = "";
    let mut chains: Vec<&str> = vec![];
    let flush = |table: &str, chains: &mut Vec<&str>, text: &mut String| {
        if !chains.is_empty() {
            let _ = writeln!(text, "*{table}");
            // Declaring a chain flushes it; then none is in use.
            for c in chains.iter() {
                let _ = writeln!(text, ":{c} - [0:0]");
            }
            for c in chains.iter() {
                let _ = writeln!(text, "-X {c}");
            }
            text.push_str("COMMIT\n");
            chains.clear();
        }
    };
    for l in saved.lines() {
        if let Some(t) = l.strip_prefix('*') {
            flush(table, &mut chains, &mut text);
            table = t;
        } else if l.starts_with(":KUBE-")
            && let Some(c) = l[1..].split_whitespace().next()
        {
            chains.push(c);
        }
    }
    flush(table, &mut chains, &mut text);
    if !text.is_empty() {
        restore(&text)?;
    }
    Ok(())
}

/// Writes the rules for the stored Services and the ready pods in the
/// node's mode, unless the last sync wrote exactly these. True when it wrote.
pub fn sync() -> Result<bool> {
    let _lock = NodeLock::acquire_at(&paths::kube_proxy_lock())?;
    let services = service::list();
    if !services.is_empty() {
        ensure_service_route();
    }
    let ports = plan(&services, &ready_pods());
    let mode = mode();
    let wanted = match mode {
        ProxyMode::Iptables => render(&ports, &BTreeSet::new()),
        ProxyMode::Nftables => crate::nftables::render(&ports),
    };
    let last = paths::kube_proxy_rules();
    if std::fs::read_to_string(&last).is_ok_and(|t| t == wanted) {
        return Ok(false);
    }
    match mode {
        ProxyMode::Iptables => {
            let wanted_chains: BTreeSet<String> = wanted
                .lines()
                .filter_map(|l| l.strip_prefix(':'))
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect();
            let stale: BTreeSet<String> = existing_chains()?
                .difference(&wanted_chains)
                .cloned()
                .collect();
            restore(&render(&ports, &stale))?;
            // After the restore: a jump needs its target chain to exist.
            ensure_jumps()?;
        }
        ProxyMode::Nftables => crate::nftables::load(&wanted)?,
    }
    std::fs::write(&last, &wanted).ctx(|| format!("cannot write {}", last.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_match_kube_proxy() {
        // Names as a real cluster shows them (default/kubernetes, kube-dns).
        assert_eq!(
            service_chain("default/kubernetes:https", "TCP"),
            "KUBE-SVC-NPX46M4PTMTKRN6Y"
        );
        assert_eq!(
            service_chain("kube-system/kube-dns:dns", "UDP"),
            "KUBE-SVC-TCOU7JCQXEZGVUNU"
        );
        assert_eq!(
            service_chain("kube-system/kube-dns:dns-tcp", "TCP"),
            "KUBE-SVC-ERIFXISQEP7F7OF4"
        );
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    fn pod(name: &str, ip: [u8; 4], app: &str) -> ReadyPod {
        ReadyPod {
            namespace: "shop".into(),
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            labels: [("app".to_string(), app.to_string())].into(),
        }
    }

    #[test]
    fn renders_kube_proxys_layout() {
        let svc = Service::parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 198.19.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
            "s",
        )
        .unwrap();
        let empty = Service::parse(
            "apiVersion: v1\nkind: Service\nmetadata: {name: none, namespace: shop}\nspec:\n  clusterIP: 198.19.0.11\n  selector: {app: nothing}\n  ports: [{port: 80}]\n",
            "s",
        )
        .unwrap();
        let pods = [
            pod("a", [198, 18, 0, 5], "web"),
            pod("b", [198, 18, 0, 6], "web"),
            pod("c", [198, 18, 0, 7], "db"),
        ];
        let ports = plan(&[svc, empty], &pods);
        assert_eq!(ports[0].endpoints, ["198.18.0.5:8080", "198.18.0.6:8080"]);
        assert!(ports[1].endpoints.is_empty());
        let text = render(&ports, &BTreeSet::new());
        let svc_chain = service_chain("shop/web:http", "TCP");
        let sep = endpoint_chain("shop/web:http", "TCP", "198.18.0.5:8080");
        for want in [
            format!("-A KUBE-SERVICES -m comment --comment \"shop/web:http cluster IP\" -m tcp -p tcp -d 198.19.0.10/32 --dport 80 -j {svc_chain}"),
            format!("-A {svc_chain} -m comment --comment \"shop/web:http -> 198.18.0.5:8080\" -m statistic --mode random --probability 0.5000000000 -j {sep}"),
            format!("-A {sep} -m comment --comment shop/web:http -m tcp -p tcp -j DNAT --to-destination 198.18.0.5:8080"),
            "-A KUBE-SERVICES -m comment --comment \"shop/none has no endpoints\" -m tcp -p tcp -d 198.19.0.11/32 --dport 80 -j REJECT".to_string(),
        ] {
            assert!(text.contains(&want), "missing {want} in\n{text}");
        }
        // A NodePort: KUBE-NODEPORTS -> KUBE-EXT -> KUBE-SVC; without
        // endpoints, rejected on every local address.
        let mut np = ports.clone();
        np[0].node_port = Some(30080);
        np[1].node_port = Some(30081);
        let text = render(&np, &BTreeSet::new());
        let ext = external_chain("shop/web:http", "TCP");
        assert_eq!(&ext[9..], &svc_chain[9..]);
        for want in [
            format!("-A KUBE-NODEPORTS -m comment --comment shop/web:http -m tcp -p tcp --dport 30080 -j {ext}"),
            format!("-A {ext} -j {svc_chain}"),
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"shop/none has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30081 -j REJECT".to_string(),
        ] {
            assert!(text.contains(&want), "missing {want} in\n{text}");
        }
        // The last endpoint takes what is left: no statistic match.
        assert!(text.contains("-> 198.18.0.6:8080\" -j KUBE-SEP-"), "{text}");
    }

    /// kube-proxy's own expected output (its TestOverallIPTablesRules,
    /// renumbered; source and licence in the file). The agent's parser is
    /// tested on the same file, so each is checked against kube-proxy.
    const UPSTREAM: &str =
        include_str!("../../agent/tests/fixtures/kube-proxy-upstream-nodeports.txt");

    /// What the writer cannot express is left out by name: kube-proxy's
    /// optional matches (`nfacct` counters, `--random-fully`), the
    /// localhost NodePort rules (route_localnet), external and
    /// load-balancer IPs, session affinity and externalTrafficPolicy Local.
    fn comparable(line: &str) -> Option<String> {
        if !line.starts_with("-A ")
            || line.contains("127.0.0.0/8")
            || line.contains("external IP")
            || line.contains("KUBE-EXT-4SW47YFZTEDKD3PK")
            // ns2 (Local policy, load balancer) and ns5 (load balancer,
            // affinity), with their chains' uncommented rules.
            || ["ns2/svc2", "ns5/svc5", "GNZBNJ2PO5MGZ6GT", "NUKIZ6OKUXPJNT4C"]
                .iter()
                .any(|s| line.contains(s))
        {
            return None;
        }
        let mut l = line.replace("/32 ", " ");
        for optional in [
            " -m nfacct --nfacct-name ct_state_invalid_dropped_pkts",
            " --random-fully",
        ] {
            l = l.replace(optional, "");
        }
        Some(l)
    }

    #[test]
    fn writes_kube_proxys_own_layout() {
        let ep = |ip: u8| format!("198.18.180.{ip}:80");
        let port = |ns: &str, ip: u8, node_port, endpoints: Vec<String>| ServicePortRules {
            port_name: format!("{ns}:p80"),
            protocol: "TCP".into(),
            cluster_ip: Ipv4Addr::new(198, 19, 0, ip),
            port: 80,
            node_port,
            endpoints,
        };
        // kube-proxy's ns1 (ClusterIP), ns3 (NodePort), ns4 (two
        // endpoints) and ns6 (no endpoints), in the renumbered addresses.
        let ports = [
            port("ns1/svc1", 41, None, vec![ep(1)]),
            port("ns3/svc3", 43, Some(3003), vec![ep(3)]),
            port("ns4/svc4", 44, None, vec![ep(4), ep(5)]),
            port("ns6/svc6", 46, None, vec![]),
        ];
        let mut ours = render(&ports, &BTreeSet::new());
        // KUBE-SEP names hash the endpoint as kube-proxy saw it (its
        // original address, from the fixture's header): computed from it,
        // they must be kube-proxy's.
        for p in &ports {
            for e in &p.endpoints {
                let original = crate::upstream::as_kube_proxy_saw_it(UPSTREAM, e);
                ours = ours.replace(
                    &endpoint_chain(&p.port_name, "TCP", e),
                    &endpoint_chain(&p.port_name, "TCP", &original),
                );
            }
        }
        let mut want: Vec<String> = UPSTREAM.lines().filter_map(comparable).collect();
        let mut have: Vec<String> = ours.lines().filter_map(comparable).collect();
        want.sort();
        have.sort();
        let missing: Vec<_> = want.iter().filter(|l| !have.contains(l)).collect();
        let extra: Vec<_> = have.iter().filter(|l| !want.contains(l)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "kube-proxy writes but the test node does not:\n{}\nthe test node writes but kube-proxy does not:\n{}",
            missing
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            extra
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        );
        assert!(want.len() >= 20, "compared too little: {want:#?}");
    }
}
