//! The test node plays kube-proxy's nftables mode (`--proxy-mode nftables`,
//! GA since Kubernetes 1.33): the same Service ports and endpoints as the
//! iptables mode ([`crate::kubeproxy::plan`]) become `table ip kube-proxy`
//! as kubernetes/pkg/proxy/nftables/proxier.go writes it: its base chains,
//! the `service-ips` / `service-nodeports` verdict maps, one
//! `service-<hash>-<ns>/<name>/<proto>/<port>` chain per Service port with
//! its `numgen random mod N vmap` endpoint choice, `external-…` chains for
//! NodePorts, `endpoint-…` chains with their `dnat to`, and the
//! `no-endpoint-services` / `no-endpoint-nodeports` maps that send a Service
//! without endpoints to `reject-chain`. `--nodeport-addresses` is left at
//! "all", so NodePorts match `fib daddr type local` (no `nodeport-ips`
//! set), as the iptables mode's `--dst-type LOCAL` does.
//!
//! Each sync replaces the whole table in one `nft -f` transaction (what
//! kube-proxy's full resync amounts to).

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::{error::Result, kubeproxy::ServicePortRules, paths};

/// kube-proxy's masquerade mark (`--masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";

/// `HASH-ns/name/proto/port`: base32(sha256(name))[..8], then the name.
fn hash_and_name(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    format!("{}-{name}", &crate::kubeproxy::base32(&digest)[..8])
}

/// `ns/name/proto/port` from `ns/name:port` (the port name empty when unnamed).
fn chain_base(port_name: &str, protocol: &str) -> String {
    let (ns, rest) = port_name.split_once('/').unwrap_or(("", port_name));
    let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
    format!("{ns}/{name}/{}/{port}", protocol.to_lowercase())
}

pub fn service_chain(port_name: &str, protocol: &str) -> String {
    format!(
        "service-{}",
        hash_and_name(&chain_base(port_name, protocol))
    )
}

pub fn external_chain(port_name: &str, protocol: &str) -> String {
    service_chain(port_name, protocol).replacen("service-", "external-", 1)
}

/// `endpoint-HASH-ns/name/proto/port__ip/port`.
pub fn endpoint_chain(port_name: &str, protocol: &str, endpoint: &str) -> String {
    let (ip, port) = endpoint.rsplit_once(':').unwrap_or((endpoint, ""));
    format!(
        "endpoint-{}",
        hash_and_name(&format!("{}__{ip}/{port}", chain_base(port_name, protocol)))
    )
}

/// kube-proxy's table-level objects and base chains (proxier.go's
/// setupNFTables, for IPv4 with every address accepting NodePorts).
fn base(out: &mut String) {
    let t = "ip kube-proxy";
    let lines = [
        format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}"),
        // Replaced whole: what a full resync leaves.
        format!("delete table {t}"),
        format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}"),
        format!("add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"),
        format!(
            "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
        ),
        format!(
            "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
        ),
        format!(
            "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
        ),
        format!(
            "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
        ),
        format!(
            "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
        ),
        format!("add chain {t} cluster-ips-check"),
        format!(
            "add chain {t} filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}"
        ),
        format!(
            "add chain {t} filter-output-pre-dnat {{ type filter hook output priority -110 ; }}"
        ),
        format!("add chain {t} filter-forward {{ type filter hook forward priority 0 ; }}"),
        format!("add chain {t} filter-input {{ type filter hook input priority 0 ; }}"),
        format!("add chain {t} filter-output {{ type filter hook output priority 0 ; }}"),
        format!("add chain {t} firewall-check"),
        format!("add chain {t} mark-for-masquerade"),
        format!("add chain {t} masquerading"),
        format!("add chain {t} nat-output {{ type nat hook output priority -100 ; }}"),
        format!("add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}"),
        format!("add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}"),
        format!("add chain {t} nodeport-endpoints-check"),
        format!(
            "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
        ),
        format!("add chain {t} services"),
        format!("add chain {t} service-endpoints-check"),
        format!(
            "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
        ),
        format!(
            "add rule {t} cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
            paths::SERVICE_SUBNET
        ),
        format!("add rule {t} filter-prerouting-pre-dnat ct state new jump firewall-check"),
        format!("add rule {t} filter-forward ct state new jump service-endpoints-check"),
        format!("add rule {t} filter-forward ct state new jump cluster-ips-check"),
        format!("add rule {t} filter-input ct state new jump nodeport-endpoints-check"),
        format!("add rule {t} filter-input ct state new jump service-endpoints-check"),
        format!("add rule {t} filter-output ct state new jump service-endpoints-check"),
        format!("add rule {t} filter-output-pre-dnat ct state new jump firewall-check"),
        format!("add rule {t} filter-output ct state new jump cluster-ips-check"),
        format!(
            "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
        ),
        format!("add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}"),
        format!("add rule {t} masquerading mark and {MASQ_MARK} == 0 return"),
        format!("add rule {t} masquerading mark set mark xor {MASQ_MARK}"),
        format!("add rule {t} masquerading masquerade fully-random"),
        format!("add rule {t} nat-output jump services"),
        format!("add rule {t} nat-postrouting jump masquerading"),
        format!("add rule {t} nat-prerouting jump services"),
        format!(
            "add rule {t} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"
        ),
        format!("add rule {t} reject-chain reject"),
        format!("add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"),
        format!(
            "add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
        ),
        format!(
            "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
        ),
    ];
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
}

/// The `nft -f` input for these Service ports: the whole table, replaced in
/// one transaction. Chains are declared before the rules that name them.
pub fn render(ports: &[ServicePortRules]) -> String {
    let t = "ip kube-proxy";
    let mut out = String::new();
    base(&mut out);
    let (mut chains, mut rules, mut elements) = (String::new(), String::new(), String::new());
    for sp in ports {
        let proto = sp.protocol.to_lowercase();
        let cip = sp.cluster_ip;
        let _ = writeln!(elements, "add element {t} cluster-ips {{ {cip} }}");
        if sp.endpoints.is_empty() {
            // kube-proxy's comment is the ServicePortName: `ns/svc:port`.
            let c = &sp.port_name;
            let _ = writeln!(
                elements,
                "add element {t} no-endpoint-services {{ {cip} . {proto} . {} comment \"{c}\" : goto reject-chain }}",
                sp.port
            );
            if let Some(np) = sp.node_port {
                let _ = writeln!(
                    elements,
                    "add element {t} no-endpoint-nodeports {{ {proto} . {np} comment \"{c}\" : goto reject-chain }}"
                );
            }
            continue;
        }
        let svc = service_chain(&sp.port_name, &sp.protocol);
        let _ = writeln!(chains, "add chain {t} {svc}");
        let _ = writeln!(
            rules,
            "add rule {t} {svc} ip daddr {cip} ip saddr != {} jump mark-for-masquerade",
            paths::POD_SUBNET
        );
        let mut arms = vec![];
        for (i, ep) in sp.endpoints.iter().enumerate() {
            let chain = endpoint_chain(&sp.port_name, &sp.protocol, ep);
            let ip = ep.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(ep);
            let _ = writeln!(chains, "add chain {t} {chain}");
            let _ = writeln!(
                rules,
                "add rule {t} {chain} ip saddr {ip} jump mark-for-masquerade"
            );
            let _ = writeln!(
                rules,
                "add rule {t} {chain} meta l4proto {proto} dnat to {ep}"
            );
            arms.push(format!("{i} : goto {chain}"));
        }
        let _ = writeln!(
            rules,
            "add rule {t} {svc} numgen random mod {} vmap {{ {} }}",
            arms.len(),
            arms.join(" , ")
        );
        let _ = writeln!(
            elements,
            "add element {t} service-ips {{ {cip} . {proto} . {} : goto {svc} }}",
            sp.port
        );
        // NodePorts (externalTrafficPolicy Cluster): masquerade, then the Service.
        if let Some(np) = sp.node_port {
            let ext = external_chain(&sp.port_name, &sp.protocol);
            let _ = writeln!(chains, "add chain {t} {ext}");
            let _ = writeln!(rules, "add rule {t} {ext} jump mark-for-masquerade");
            let _ = writeln!(rules, "add rule {t} {ext} goto {svc}");
            let _ = writeln!(
                elements,
                "add element {t} service-nodeports {{ {proto} . {np} : goto {ext} }}"
            );
        }
    }
    out.push_str(&chains);
    out.push_str(&rules);
    out.push_str(&elements);
    out
}

/// Loads a script with `nft -f -` in the node's namespace.
pub fn load(script: &str) -> Result<()> {
    crate::netns::feed_in_node("nft", &["-f", "-"], script)
}

/// Removes kube-proxy's nftables table (kube-proxy's CleanupLeftovers when
/// it starts in another mode); nothing to do when there is none.
pub fn remove() -> Result<()> {
    // add + delete: deleting alone fails when the table is not there.
    load("add table ip kube-proxy\ndelete table ip kube-proxy\n")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn chain_names_match_kube_proxy() {
        // kube-proxy's own names in its TestOverallNFTablesRules.
        assert_eq!(
            service_chain("ns1/svc1:p80", "TCP"),
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            external_chain("ns2/svc2:p80", "TCP"),
            "external-42NFTM6N-ns2/svc2/tcp/p80"
        );
        // Endpoint chains hash kube-proxy's original address: computed from
        // it and renumbered, they are the names in its expected rules.
        for (port, ip) in [("ns1/svc1:p80", 1), ("ns4/svc4:p80", 5)] {
            let original =
                crate::upstream::as_kube_proxy_saw_it(UPSTREAM, &format!("198.18.180.{ip}:80"));
            let name =
                crate::upstream::renumbered(UPSTREAM, &endpoint_chain(port, "TCP", &original));
            assert!(
                name.ends_with(&format!("__198.18.180.{ip}/80"))
                    && UPSTREAM
                        .lines()
                        .any(|l| l == format!("add chain ip kube-proxy {name}")),
                "{name} is not among kube-proxy's chains"
            );
        }
    }

    /// kube-proxy's own expected rules (TestOverallNFTablesRules, renumbered;
    /// source and licence in the file). The agent's reader is tested on the
    /// same rules, so each side is checked against kube-proxy.
    const UPSTREAM: &str =
        include_str!("../../agent/tests/fixtures/kube-proxy-upstream-nftables.nft");

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
        // kube-proxy's ns1 (ClusterIP), ns3 (NodePort), ns4 (two endpoints)
        // and ns6 (no endpoints), in the renumbered addresses.
        let ports = [
            port("ns1/svc1", 41, None, vec![ep(1)]),
            port("ns3/svc3", 43, Some(3003), vec![ep(3)]),
            port("ns4/svc4", 44, None, vec![ep(4), ep(5)]),
            port("ns6/svc6", 46, None, vec![]),
        ];
        let mut ours = render(&ports);
        // Chain names hash the endpoint as kube-proxy saw it (its original
        // address, from the fixture's header).
        for p in &ports {
            for e in &p.endpoints {
                let original = crate::upstream::as_kube_proxy_saw_it(UPSTREAM, e);
                let renumbered_name = crate::upstream::renumbered(
                    UPSTREAM,
                    &endpoint_chain(&p.port_name, "TCP", &original),
                );
                ours = ours.replace(&endpoint_chain(&p.port_name, "TCP", e), &renumbered_name);
            }
        }
        // Only what the writer expresses: the Services it plays (not ns4's
        // external IP), and the base rules other than the NodePort address
        // choice (kube-proxy's test names its node's addresses; the test
        // node accepts all).
        let relevant = |l: &&str| {
            l.starts_with("add ")
                && ![
                    "ns2/svc2",
                    "ns5/svc5",
                    "198.19.0.42",
                    "198.19.0.45",
                    "nodeport-ips",
                    "delete table",
                    "external-LAUZTJTB",
                ]
                .iter()
                .any(|s| l.contains(s))
        };
        let mut want: Vec<&str> = UPSTREAM.lines().filter(relevant).collect();
        let mut have: Vec<&str> = ours.lines().filter(relevant).collect();
        want.sort();
        have.sort();
        want.dedup();
        have.dedup();
        let missing: Vec<_> = want.iter().filter(|l| !have.contains(l)).collect();
        let extra: Vec<_> = have.iter().filter(|l| !want.contains(l)).collect();
        // The test node's NodePort rules match every local address.
        let all_addresses = [
            "add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
            "add rule ip kube-proxy nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports",
        ];
        assert!(
            missing.is_empty() && extra.iter().all(|l| all_addresses.contains(l)),
            "kube-proxy writes but the test node does not:\n{missing:#?}\nthe test node writes but kube-proxy does not:\n{extra:#?}"
        );
        assert!(want.len() >= 40, "compared too little: {want:#?}");
    }
}
