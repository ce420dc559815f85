//! kube-proxy's iptables mode, as `iptables-save` prints it (nat and filter
//! tables): `KUBE-SERVICES` gives each ClusterIP:port its Service (from
//! kube-proxy's comment `ns/svc:port cluster IP`) and `KUBE-SVC-*` chain, the
//! `KUBE-SVC-*` chain its `KUBE-SEP-*` chains, each `KUBE-SEP-*` its DNAT
//! target; the filter table's `has no endpoints` REJECT (and `has no local
//! endpoints` DROP) rules name the Services that have none.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use super::service_map::{ServiceMap, ServiceRef, endpoints_of, service_ref};

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
    /// kube-proxy's IPVS mode: its `KUBE-SERVICES` matches ipsets of
    /// ClusterIPs (`--match-set KUBE-CLUSTER-IP`) instead of naming them.
    pub ipvs: bool,
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
        if line.contains("--match-set KUBE-CLUSTER-IP ") {
            self.ipvs = true;
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

/// A [`ServiceMap`] from `iptables-save` output (both tables in one text, or either).
pub fn parse(text: &str) -> ServiceMap {
    let mut b = ServiceMapBuilder::default();
    for line in text.lines() {
        b.line(line);
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::service_map::svc;

    /// Recorded with `iptables-save` from the test node playing kube-proxy
    /// (two endpoints behind one Service, one Service without endpoints).
    const SAVED: &str = include_str!("../../tests/fixtures/kube-proxy-iptables-save.txt");

    #[test]
    fn parses_kube_proxys_rules() {
        let map = parse(SAVED);
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
    const UPSTREAM: &str = include_str!("../../tests/fixtures/kube-proxy-upstream-nodeports.txt");

    #[test]
    fn parses_kube_proxys_nodeports_external_and_load_balancer_ips() {
        let mut map = parse(UPSTREAM);
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
    fn words_keep_quoted_comments() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a b" -j Y"#),
            ["-A", "X", "-m", "comment", "--comment", "a b", "-j", "Y"]
        );
    }
}
