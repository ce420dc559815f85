//! kube-proxy's rules as a Service map, and the attribution of what the
//! packet probes saw to pods, Services and endpoints.
//!
//! The map comes from `iptables-save` (nat and filter tables) in the network
//! namespace where the rules live: `KUBE-SERVICES` gives each ClusterIP:port
//! its Service (from kube-proxy's comment `ns/svc:port cluster IP`) and
//! `KUBE-SVC-*` chain, the `KUBE-SVC-*` chain its `KUBE-SEP-*` chains, each
//! `KUBE-SEP-*` its DNAT target; the filter table's `has no endpoints`
//! REJECT (and `has no local endpoints` DROP) rules name the Services that
//! have none. It is re-read on a timer and rebuilt only when the text changed.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    metadata::PodIdentity,
    probes::net::{RawConn, RawDrop, Tuple, proto_name},
};

/// A Service port, as kube-proxy names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// The Service port's name, or its number when it has none.
    pub port: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceEntry {
    pub service: Option<ServiceRef>,
    /// DNAT targets of its endpoint chains, in rule order.
    pub endpoints: Vec<SocketAddr>,
    /// The filter table rejects (or drops) it: kube-proxy's "has no endpoints".
    pub no_endpoints: bool,
}

/// ClusterIP:port/protocol → Service, and NodePort/protocol → Service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceMap {
    /// ClusterIPs, external IPs and load-balancer IPs.
    pub by_addr: HashMap<(IpAddr, u16, String), ServiceEntry>,
    /// NodePorts: kube-proxy matches them on every local address of the
    /// node (`-m addrtype --dst-type LOCAL`), so they are keyed by port.
    pub node_ports: HashMap<(u16, String), ServiceEntry>,
    /// The addresses of the rules' network namespace, where a NodePort
    /// answers; filled by the rules reader, `deps::rules` (kube-proxy's default
    /// `--nodeport-addresses`: all of them).
    pub local_addrs: HashSet<IpAddr>,
}

/// Splits an iptables-save rule into words, keeping "quoted strings" whole.
fn words(line: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The options of one rule that matter here.
#[derive(Default, Debug)]
struct Rule {
    chain: String,
    dst: Option<IpAddr>,
    proto: Option<String>,
    dport: Option<u16>,
    comment: Option<String>,
    jump: Option<String>,
    to_destination: Option<SocketAddr>,
    /// `-m addrtype --dst-type LOCAL`: any address of the node (NodePorts).
    dst_local: bool,
}

fn parse_rule(line: &str) -> Option<Rule> {
    let w = words(line);
    if w.first().map(String::as_str) != Some("-A") {
        return None;
    }
    let mut r = Rule {
        chain: w.get(1)?.clone(),
        ..Rule::default()
    };
    let mut i = 2;
    while i < w.len() {
        let next = w.get(i + 1);
        match w[i].as_str() {
            "-d" => r.dst = next.and_then(|d| d.split('/').next()?.parse().ok()),
            "-p" => r.proto = next.cloned(),
            "--dport" => r.dport = next.and_then(|p| p.parse().ok()),
            "--comment" => r.comment = next.cloned(),
            "-j" => r.jump = next.cloned(),
            "--to-destination" => r.to_destination = next.and_then(|d| d.parse().ok()),
            "--dst-type" => r.dst_local = next.is_some_and(|t| t == "LOCAL"),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    Some(r)
}

/// `ns/svc:port` (or `ns/svc`) → the Service; `port` is the number when unnamed.
fn service_ref(name: &str, port: u16) -> Option<ServiceRef> {
    let (ns, rest) = name.split_once('/')?;
    let (svc, port_name) = match rest.split_once(':') {
        Some((s, p)) => (s, p.to_string()),
        None => (rest, port.to_string()),
    };
    Some(ServiceRef {
        namespace: ns.to_string(),
        name: svc.to_string(),
        port: port_name,
    })
}

/// The per-Service chains a Service address or NodePort leads into:
/// KUBE-SVC (cluster policy), KUBE-SVL (local policy), KUBE-EXT (external
/// traffic: masquerade, then SVC or SVL), KUBE-FW (load-balancer source
/// ranges, then EXT).
fn is_service_chain(c: &str) -> bool {
    ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-"]
        .iter()
        .any(|p| c.starts_with(p))
}

/// What the rules of one Service address say, before chains are followed.
struct Entry {
    key: (Option<IpAddr>, u16, String),
    service: Option<ServiceRef>,
    chain: String,
}

/// Builds a [`ServiceMap`] from `iptables-save` output one line at a time,
/// as the rules reader streams it (no copy of the text is kept).
#[derive(Default)]
pub struct ServiceMapBuilder {
    table: &'static str,
    entries: Vec<Entry>,
    jumps: HashMap<String, Vec<String>>,
    sep_dnat: HashMap<String, SocketAddr>,
    map: ServiceMap,
    /// Whether kube-proxy's chains were seen at all.
    pub has_kube_chains: bool,
}

impl ServiceMapBuilder {
    pub fn line(&mut self, line: &str) {
        if let Some(t) = line.strip_prefix('*') {
            self.table = if t == "nat" {
                "nat"
            } else if t == "filter" {
                "filter"
            } else {
                ""
            };
            return;
        }
        if line.starts_with(":KUBE-SERVICES") {
            self.has_kube_chains = true;
        }
        let Some(rule) = parse_rule(line) else {
            return;
        };
        let jump = rule.jump.clone().unwrap_or_default();
        let proto = || rule.proto.clone().unwrap_or_else(|| "tcp".into());
        let comment = rule.comment.as_deref().unwrap_or("");
        match (self.table, rule.chain.as_str()) {
            // ClusterIPs (`ns/svc:port cluster IP`), external IPs and
            // load-balancer IPs, each with its destination.
            ("nat", "KUBE-SERVICES") if is_service_chain(&jump) => {
                let (Some(ip), Some(port)) = (rule.dst, rule.dport) else {
                    return;
                };
                let name = [" cluster IP", " external IP", " loadbalancer IP"]
                    .iter()
                    .find_map(|s| comment.strip_suffix(s))
                    .unwrap_or("");
                self.entries.push(Entry {
                    key: (Some(ip), port, proto()),
                    service: service_ref(name, port),
                    chain: jump,
                });
            }
            // NodePorts: the comment is the bare `ns/svc:port`; the jump
            // is KUBE-EXT (1.24+) or KUBE-SVC (older kube-proxy).
            ("nat", "KUBE-NODEPORTS") if is_service_chain(&jump) => {
                let Some(port) = rule.dport else { return };
                // Only the rule for every local address: 1.26+ adds one
                // for 127.0.0.0/8 (route_localnet) that says the same.
                if rule.dst.is_some() {
                    return;
                }
                self.entries.push(Entry {
                    key: (None, port, proto()),
                    service: service_ref(comment, port),
                    chain: jump,
                });
            }
            ("nat", c) if is_service_chain(c) && !jump.is_empty() => {
                self.jumps.entry(c.to_string()).or_default().push(jump);
            }
            ("nat", c) if c.starts_with("KUBE-SEP-") && jump == "DNAT" => {
                if let Some(to) = rule.to_destination {
                    self.sep_dnat.insert(c.to_string(), to);
                }
            }
            ("filter", "KUBE-SERVICES" | "KUBE-EXTERNAL-SERVICES" | "KUBE-NODEPORTS")
                if jump == "REJECT" || jump == "DROP" =>
            {
                let name = comment
                    .strip_suffix(" has no endpoints")
                    .or_else(|| comment.strip_suffix(" has no local endpoints"));
                let (Some(name), Some(port)) = (name, rule.dport) else {
                    return;
                };
                let e = match rule.dst {
                    Some(ip) => self.map.by_addr.entry((ip, port, proto())).or_default(),
                    None if rule.dst_local => {
                        self.map.node_ports.entry((port, proto())).or_default()
                    }
                    None => return,
                };
                e.service = service_ref(name, port);
                e.no_endpoints = true;
            }
            _ => {}
        }
    }

    pub fn finish(self) -> ServiceMap {
        let mut map = self.map;
        for entry in self.entries {
            let endpoints = endpoints_of(&entry.chain, &self.jumps, &self.sep_dnat);
            let (ip, port, proto) = entry.key;
            let e = match ip {
                Some(ip) => map.by_addr.entry((ip, port, proto)).or_default(),
                None => map.node_ports.entry((port, proto)).or_default(),
            };
            e.service = entry.service;
            e.endpoints = endpoints;
        }
        map
    }
}

impl ServiceMap {
    /// From `iptables-save` output (both tables in one text, or either).
    pub fn parse(text: &str) -> ServiceMap {
        let mut b = ServiceMapBuilder::default();
        for line in text.lines() {
            b.line(line);
        }
        b.finish()
    }

    /// The Service `dst` belongs to: a Service address, else a NodePort on
    /// one of the node's addresses.
    pub fn lookup(&self, proto: u8, dst: SocketAddr) -> Option<&ServiceEntry> {
        let proto = proto_name(proto).to_string();
        self.by_addr
            .get(&(dst.ip(), dst.port(), proto.clone()))
            .or_else(|| {
                self.local_addrs
                    .contains(&dst.ip())
                    .then(|| self.node_ports.get(&(dst.port(), proto)))
                    .flatten()
            })
    }

    /// Service addresses and NodePorts.
    pub fn len(&self) -> usize {
        self.by_addr.len() + self.node_ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The DNAT targets reached from a Service chain, in rule order, following
/// KUBE-FW → KUBE-EXT → KUBE-SVC/KUBE-SVL → KUBE-SEP (each chain once).
fn endpoints_of(
    chain: &str,
    jumps: &HashMap<String, Vec<String>>,
    sep_dnat: &HashMap<String, SocketAddr>,
) -> Vec<SocketAddr> {
    let mut out = vec![];
    let mut visited = HashSet::new();
    let mut stack = vec![chain.to_string()];
    // Depth-first in rule order: push targets reversed.
    while let Some(c) = stack.pop() {
        if !visited.insert(c.clone()) {
            continue;
        }
        if let Some(to) = sep_dnat.get(&c) {
            if !out.contains(to) {
                out.push(*to);
            }
            continue;
        }
        if let Some(targets) = jumps.get(&c) {
            stack.extend(
                targets
                    .iter()
                    .rev()
                    .filter(|t| t.starts_with("KUBE-SEP-") || is_service_chain(t))
                    .cloned(),
            );
        }
    }
    out
}

/// This thread's network namespace's interface addresses (getifaddrs(3)).
pub fn local_addrs() -> Option<HashSet<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut out = HashSet::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned; the
        // sockaddr is read by its family's size.
        unsafe {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET => {
                        let a = &*(sa as *const libc::sockaddr_in);
                        out.insert(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let a = &*(sa as *const libc::sockaddr_in6);
                        out.insert(IpAddr::from(a.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Some(out)
}

/// What happened to a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Forwarded,
    RejectedNoEndpoints,
    Dropped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::RejectedNoEndpoints => "rejected_no_endpoints",
            Outcome::Dropped => "dropped",
        }
    }
}

/// A pod by name, for the endpoint side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
}

/// One new connection's path: `kind: "connection"` in JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Connection {
    #[serde(serialize_with = "crate::events::rfc3339")]
    pub ts: SystemTime,
    pub protocol: &'static str,
    pub src: SocketAddr,
    /// Where the client sent it (e.g. the ClusterIP).
    pub dst: SocketAddr,
    /// Where it went after DNAT (the endpoint); null when rejected or dropped first.
    pub endpoint: Option<SocketAddr>,
    pub endpoint_pod: Option<PodRef>,
    /// The Service of `dst`; null for traffic that touches no Service.
    pub service: Option<ServiceRef>,
    pub outcome: Outcome,
    /// The kernel's drop reason, when it was dropped or rejected.
    pub reason: Option<String>,
    /// The client pod (by source IP); all null for the host.
    #[serde(flatten)]
    pub pod: PodIdentity,
}

/// A packet dropped with a reason: `kind: "drop"` in JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PacketDrop {
    #[serde(serialize_with = "crate::events::rfc3339")]
    pub ts: SystemTime,
    pub reason: String,
    pub protocol: Option<&'static str>,
    pub src: Option<SocketAddr>,
    pub dst: Option<SocketAddr>,
    /// The pod that sent it (by source IP), or all null.
    #[serde(flatten)]
    pub pod: PodIdentity,
}

/// Connections whose outcome was reported, so a SYN retransmitted into a
/// DROP counts once. Bounded: the oldest are forgotten first, in O(1)
/// (insertion order is kept beside the map, so no scan under load).
pub struct Seen {
    at: HashMap<Tuple, Instant>,
    order: std::collections::VecDeque<(Instant, Tuple)>,
    cap: usize,
    ttl: Duration,
}

impl Seen {
    pub fn new(cap: usize, ttl: Duration) -> Seen {
        Seen {
            at: HashMap::new(),
            order: std::collections::VecDeque::new(),
            cap,
            ttl,
        }
    }

    /// True the first time a tuple is seen within the ttl.
    pub fn first(&mut self, t: Tuple) -> bool {
        let now = Instant::now();
        if self
            .at
            .get(&t)
            .is_some_and(|s| now.duration_since(*s) < self.ttl)
        {
            return false;
        }
        self.at.insert(t, now);
        self.order.push_back((now, t));
        while self.at.len() > self.cap {
            self.pop_oldest();
        }
        true
    }

    /// Forgets the oldest entry (skipping order records of re-inserted tuples).
    fn pop_oldest(&mut self) {
        while let Some((at, t)) = self.order.pop_front() {
            if self.at.get(&t) == Some(&at) {
                self.at.remove(&t);
                return;
            }
        }
    }

    pub fn gc(&mut self) {
        let now = Instant::now();
        while let Some(&(at, t)) = self.order.front() {
            if now.duration_since(at) < self.ttl {
                break;
            }
            self.order.pop_front();
            if self.at.get(&t) == Some(&at) {
                self.at.remove(&t);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

/// Turns a forwarded connection into its event (None: not worth a line,
/// e.g. a reply direction).
pub fn connection(
    raw: &RawConn,
    map: &ServiceMap,
    pod_of: &dyn Fn(IpAddr) -> Option<PodIdentity>,
) -> Connection {
    let entry = map.lookup(raw.orig.proto, raw.orig.dst);
    let endpoint = raw.dnat.then_some(raw.translated);
    Connection {
        ts: raw.ts,
        protocol: proto_name(raw.orig.proto),
        src: raw.orig.src,
        dst: raw.orig.dst,
        endpoint,
        endpoint_pod: endpoint.and_then(|e| pod_of(e.ip())).and_then(pod_ref),
        service: entry.and_then(|e| e.service.clone()),
        outcome: Outcome::Forwarded,
        reason: None,
        pod: pod_of(raw.orig.src.ip()).unwrap_or_default(),
    }
}

fn pod_ref(p: PodIdentity) -> Option<PodRef> {
    Some(PodRef {
        namespace: p.namespace?,
        pod: p.pod?,
    })
}

/// A drop, and the Service connection it ended when its original
/// destination is a Service: rejected when kube-proxy says the Service has
/// no endpoints, dropped otherwise.
pub fn drop_events(
    raw: &RawDrop,
    map: &ServiceMap,
    pod_of: &dyn Fn(IpAddr) -> Option<PodIdentity>,
) -> (PacketDrop, Option<Connection>) {
    let t = raw.tuple;
    // The pod that sent it, else the one it was going to (e.g. a reply being
    // delivered into a pod's namespace).
    let pod = t
        .and_then(|t| pod_of(t.src.ip()).or_else(|| pod_of(t.dst.ip())))
        .unwrap_or_default();
    let drop = PacketDrop {
        ts: raw.ts,
        reason: raw.reason.clone(),
        protocol: t.map(|t| proto_name(t.proto)),
        src: t.map(|t| t.src),
        dst: t.map(|t| t.dst),
        pod: pod.clone(),
    };
    let conn = t.and_then(|t| {
        let entry = map.lookup(t.proto, t.dst)?;
        let service = entry.service.clone()?;
        let outcome = if entry.no_endpoints && raw.reason == "NETFILTER_DROP" {
            Outcome::RejectedNoEndpoints
        } else {
            Outcome::Dropped
        };
        // Where DNAT had sent it before it was dropped, if it had.
        let endpoint = raw.packet.map(|p| p.dst).filter(|d| *d != t.dst);
        Some(Connection {
            ts: raw.ts,
            protocol: proto_name(t.proto),
            src: t.src,
            dst: t.dst,
            endpoint,
            endpoint_pod: endpoint.and_then(|e| pod_of(e.ip())).and_then(pod_ref),
            service: Some(service),
            outcome,
            reason: Some(raw.reason.clone()),
            pod,
        })
    });
    (drop, conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded with `iptables-save` from the test node playing kube-proxy
    /// (two endpoints behind one Service, one Service without endpoints).
    const SAVED: &str = include_str!("../tests/fixtures/kube-proxy-iptables-save.txt");

    #[test]
    fn parses_kube_proxys_rules() {
        let map = ServiceMap::parse(SAVED);
        let web = map
            .lookup(6, "198.19.0.10:80".parse().unwrap())
            .expect("the ClusterIP is in the map");
        assert_eq!(
            web.service,
            Some(ServiceRef {
                namespace: "nettest".into(),
                name: "web".into(),
                port: "http".into()
            })
        );
        assert_eq!(
            web.endpoints,
            [
                "198.18.0.2:8080".parse::<SocketAddr>().unwrap(),
                "198.18.0.3:8080".parse().unwrap()
            ]
        );
        assert!(!web.no_endpoints);
        let none = map
            .lookup(6, "198.19.165.231:80".parse().unwrap())
            .expect("the no-endpoint Service is in the map");
        assert!(none.no_endpoints);
        assert_eq!(none.service.as_ref().unwrap().port, "80");
        assert!(map.lookup(17, "198.19.0.10:80".parse().unwrap()).is_none());
    }

    /// kube-proxy's own expected output for its overall rules test.
    const UPSTREAM: &str = include_str!("../tests/fixtures/kube-proxy-upstream-nodeports.txt");

    fn svc(ns: &str, name: &str, port: &str) -> Option<ServiceRef> {
        Some(ServiceRef {
            namespace: ns.into(),
            name: name.into(),
            port: port.into(),
        })
    }

    #[test]
    fn parses_kube_proxys_nodeports_external_and_load_balancer_ips() {
        let mut map = ServiceMap::parse(UPSTREAM);
        let node: IpAddr = "198.18.0.2".parse().unwrap();
        let ep = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Not an address of this node: a NodePort does not answer there.
        assert!(map.lookup(6, SocketAddr::new(node, 3003)).is_none());
        map.local_addrs.insert(node);
        // KUBE-NODEPORTS -> KUBE-EXT -> KUBE-SVC -> KUBE-SEP.
        let np = map
            .lookup(6, SocketAddr::new(node, 3003))
            .expect("NodePort");
        assert_eq!(np.service, svc("ns3", "svc3", "p80"));
        assert_eq!(np.endpoints, [ep("198.18.180.3:80")]);
        assert!(!np.no_endpoints);
        assert!(map.lookup(17, SocketAddr::new(node, 3003)).is_none());
        assert!(map.lookup(6, SocketAddr::new(node, 3999)).is_none());
        // externalTrafficPolicy Local without a local endpoint: pods still
        // reach the endpoint, the rest is dropped for every local address.
        let local = map.lookup(6, SocketAddr::new(node, 3001)).unwrap();
        assert_eq!(local.service, svc("ns2", "svc2", "p80"));
        assert_eq!(local.endpoints, [ep("198.18.180.2:80")]);
        assert!(local.no_endpoints);
        // External IP and load-balancer IP (through KUBE-FW) by address.
        let ext = map.lookup(6, ep("198.19.99.33:80")).unwrap();
        assert_eq!(ext.service, svc("ns4", "svc4", "p80"));
        assert_eq!(
            ext.endpoints,
            [ep("198.18.180.4:80"), ep("198.18.180.5:80")]
        );
        let lb = map.lookup(6, ep("5.6.7.8:80")).unwrap();
        assert_eq!(lb.service, svc("ns5", "svc5", "p80"));
        assert_eq!(lb.endpoints, [ep("198.18.180.3:80")]);
        // ClusterIPs and the Service without endpoints, as before.
        let c = map.lookup(6, ep("198.19.0.41:80")).unwrap();
        assert_eq!(c.service, svc("ns1", "svc1", "p80"));
        assert_eq!(c.endpoints, [ep("198.18.180.1:80")]);
        let none = map.lookup(6, ep("198.19.0.46:80")).unwrap();
        assert!(none.no_endpoints && none.endpoints.is_empty());
        // The health check node port is not a Service port.
        assert!(map.lookup(6, SocketAddr::new(node, 30000)).is_none());
        assert_eq!(map.node_ports.len(), 3);
    }

    #[test]
    fn a_connection_to_a_nodeport_is_attributed_to_its_service() {
        let mut map = ServiceMap::parse(UPSTREAM);
        let node: IpAddr = "198.18.0.2".parse().unwrap();
        map.local_addrs.insert(node);
        let raw = RawConn {
            ts: SystemTime::UNIX_EPOCH,
            orig: Tuple {
                proto: 6,
                src: "198.18.180.9:40000".parse().unwrap(),
                dst: SocketAddr::new(node, 3002),
            },
            translated: "198.18.180.3:80".parse().unwrap(),
            dnat: true,
            hook: 0,
            cgroup_id: 0,
        };
        let c = connection(&raw, &map, &|_| None);
        assert_eq!(c.service, svc("ns5", "svc5", "p80"));
        assert_eq!(c.endpoint, Some("198.18.180.3:80".parse().unwrap()));
        assert_eq!(c.outcome, Outcome::Forwarded);
    }

    #[test]
    fn words_keep_quoted_comments() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a b" -j Y"#),
            ["-A", "X", "-m", "comment", "--comment", "a b", "-j", "Y"]
        );
    }

    #[test]
    fn seen_reports_a_tuple_once() {
        let mut s = Seen::new(2, Duration::from_secs(60));
        let t = |p| Tuple {
            proto: 6,
            src: SocketAddr::new([198, 18, 0, 2].into(), p),
            dst: "198.19.0.10:80".parse().unwrap(),
        };
        assert!(s.first(t(1)));
        assert!(!s.first(t(1)));
        assert!(s.first(t(2)));
        assert!(s.first(t(3)));
        assert!(s.at.len() <= 2);
    }
}
