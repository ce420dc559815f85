//! kube-proxy's nftables mode (GA since Kubernetes 1.33), as `nft -j list
//! table ip kube-proxy` (and `ip6`) prints it.
//!
//! What is read keys on kube-proxy's maps and chain naming, never on its
//! base chains (their names and hooks differ between versions):
//! - the `service-ips` verdict map (ClusterIPs, external and load-balancer
//!   IPs: `addr . proto . port : goto <chain>`) and `service-nodeports`
//!   (`proto . port : goto <chain>`);
//! - `service-<hash>-<ns>/<name>/<proto>/<port>` chains (the Service's
//!   name is in the chain's name) with their `numgen random mod N vmap`
//!   endpoint choice, `external-…` chains (external traffic policy, then
//!   `goto service-…`) and `endpoint-…` chains with their `dnat to`;
//! - `no-endpoint-services` / `no-endpoint-nodeports`: each element (with
//!   kube-proxy's comment `ns/svc:port`) is a Service without endpoints,
//!   rejected (`goto reject-chain`) or dropped (`drop`, externalTrafficPolicy
//!   Local without local endpoints);
//! - `nodeport-ips`: where NodePorts answer when `--nodeport-addresses`
//!   names some (absent or empty: every local address, `fib daddr type local`).
//!
//! `firewall-ips` / `firewall-…` (loadBalancerSourceRanges) only drop: a
//! connection they drop is a Service connection that was dropped, which the
//! drop probe already reports against the Service address; `cluster-ips`
//! only rejects ports that are not a Service's.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use serde_json::Value;

use super::service_map::{ServiceMap, ServiceRef, endpoints_of, service_ref};

/// The table kube-proxy writes, in each family.
pub const TABLE: &str = "kube-proxy";

/// Why a listing could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NftError {
    #[error("nft printed something that is not JSON: {0}")]
    NotJson(String),
    #[error("nft's JSON has no \"nftables\" array")]
    NoArray,
}

/// What a verdict map element (or a vmap arm) leads to.
#[derive(Debug, PartialEq)]
enum Verdict {
    Chain(String),
    Drop,
    Reject,
    Other,
}

fn verdict(v: &Value) -> Verdict {
    let Some(o) = v.as_object() else {
        return Verdict::Other;
    };
    for k in ["goto", "jump"] {
        if let Some(t) = o
            .get(k)
            .and_then(|g| g.get("target"))
            .and_then(Value::as_str)
        {
            return Verdict::Chain(t.to_string());
        }
    }
    if o.contains_key("drop") {
        Verdict::Drop
    } else if o.contains_key("reject") {
        Verdict::Reject
    } else {
        Verdict::Other
    }
}

/// A map element's key and comment: `key` or `{"elem": {"val": key, "comment": …}}`.
fn element_key(v: &Value) -> (&Value, Option<&str>) {
    match v.get("elem") {
        Some(e) => (
            e.get("val").unwrap_or(&Value::Null),
            e.get("comment").and_then(Value::as_str),
        ),
        None => (v, None),
    }
}

/// The parts of a concatenated key (`{"concat": [...]}`).
fn concat(key: &Value) -> Option<&Vec<Value>> {
    key.get("concat")?.as_array()
}

fn proto(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        // nft prints protocols it has no name for as numbers.
        Value::Number(n) => {
            Some(crate::probes::net::proto_name(u8::try_from(n.as_u64()?).ok()?).into())
        }
        _ => None,
    }
}

fn port(v: &Value) -> Option<u16> {
    u16::try_from(v.as_u64()?).ok()
}

/// `service-<hash>-<ns>/<name>/<proto>/<port>` (also `external-`,
/// `firewall-`, `endpoint-…__<addr>/<port>`) → the Service; the port's name is
/// empty for an unnamed port, then its number stands in, as in iptables mode.
fn service_of_chain(chain: &str, port: u16) -> Option<ServiceRef> {
    let rest = ["service-", "local-", "external-", "firewall-", "endpoint-"]
        .iter()
        .find_map(|p| chain.strip_prefix(p))?;
    let (_hash, base) = rest.split_once('-')?;
    let base = base.split("__").next()?;
    let mut parts = base.splitn(4, '/');
    let (ns, name, _proto, port_name) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if ns.is_empty() || name.is_empty() {
        return None;
    }
    Some(ServiceRef {
        namespace: ns.into(),
        name: name.into(),
        port: if port_name.is_empty() {
            port.to_string()
        } else {
            port_name.into()
        },
    })
}

/// The per-Service chains whose jumps lead to endpoints: `service-`
/// (cluster traffic policy), `local-` (Local policy, newer kube-proxy) and
/// `external-` (external traffic, then one of those).
fn is_service_chain(c: &str) -> bool {
    ["service-", "local-", "external-"]
        .iter()
        .any(|p| c.starts_with(p))
}

/// One `service-ips` / `service-nodeports` element before chains are followed.
struct Entry {
    addr: Option<IpAddr>,
    port: u16,
    proto: String,
    chain: String,
    /// The chain in its table ([`chain_key`]).
    key: String,
}

/// A chain's name within its table's family.
fn chain_key(family: &str, chain: &str) -> String {
    format!("{family} {chain}")
}

/// Builds a [`ServiceMap`] from the listings of both families' tables.
#[derive(Default)]
pub struct Builder {
    entries: Vec<Entry>,
    jumps: HashMap<String, Vec<String>>,
    dnat: HashMap<String, SocketAddr>,
    map: ServiceMap,
    nodeport_ips: HashSet<IpAddr>,
    /// Whether a kube-proxy table with its `service-ips` map was seen.
    pub has_kube_table: bool,
}

impl Builder {
    /// Adds one `nft -j list table …` listing. The `nftables` array is
    /// read one object at a time (each dropped once used): a node with
    /// thousands of Services lists tens of megabytes, and a whole JSON tree
    /// of it would cost several times that.
    pub fn listing(&mut self, json: &[u8]) -> Result<(), NftError> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let found = serde::de::DeserializeSeed::deserialize(Listing(self), &mut de)
            .and_then(|f| de.end().map(|_| f))
            .map_err(|e| NftError::NotJson(e.to_string()))?;
        if found {
            Ok(())
        } else {
            Err(NftError::NoArray)
        }
    }

    /// One object of the `nftables` array.
    fn item(&mut self, item: &Value) {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            return;
        };
        if body.get("table").and_then(Value::as_str) != Some(TABLE) {
            return;
        }
        {
            // Chains are per table: a dual-stack kube-proxy gives its ip and
            // ip6 tables the same chain names.
            let family = body.get("family").and_then(Value::as_str).unwrap_or("");
            match kind.as_str() {
                "map" => self.map_elements(family, body),
                "set" if body.get("name").and_then(Value::as_str) == Some("nodeport-ips") => {
                    for e in body
                        .get("elem")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(ip) = element_key(e).0.as_str().and_then(|s| s.parse().ok()) {
                            self.nodeport_ips.insert(ip);
                        }
                    }
                }
                "rule" => self.rule(family, body),
                _ => {}
            }
        }
    }

    fn map_elements(&mut self, family: &str, body: &Value) {
        let name = body.get("name").and_then(Value::as_str).unwrap_or("");
        if name == "service-ips" {
            self.has_kube_table = true;
        }
        let elems = body.get("elem").and_then(Value::as_array);
        for pair in elems.into_iter().flatten() {
            let Some([k, v]) = pair.as_array().map(Vec::as_slice) else {
                continue;
            };
            let (key, comment) = element_key(k);
            let Some(parts) = concat(key) else { continue };
            // addr . proto . port, or proto . port (NodePorts).
            let (addr, rest) = match parts.as_slice() {
                [a, p, n] => (
                    Some(a.as_str().and_then(|s| s.parse::<IpAddr>().ok())),
                    [p, n],
                ),
                [p, n] => (None, [p, n]),
                _ => continue,
            };
            let (Some(proto), Some(port)) = (proto(rest[0]), port(rest[1])) else {
                continue;
            };
            let addr = match addr {
                Some(Some(a)) => Some(a),
                Some(None) => continue,
                None => None,
            };
            match (name, verdict(v)) {
                ("service-ips" | "service-nodeports", Verdict::Chain(chain)) => {
                    self.entries.push(Entry {
                        addr,
                        port,
                        proto,
                        key: chain_key(family, &chain),
                        chain,
                    });
                }
                ("no-endpoint-services" | "no-endpoint-nodeports", v) if v != Verdict::Other => {
                    let e = match addr {
                        Some(a) => self.map.by_addr.entry((a, port, proto)).or_default(),
                        None => self.map.node_ports.entry((port, proto)).or_default(),
                    };
                    if let Some(s) = comment.and_then(|c| service_ref(c, port)) {
                        e.service = Some(s);
                    }
                    e.no_endpoints = true;
                }
                _ => {}
            }
        }
    }

    fn rule(&mut self, family: &str, body: &Value) {
        let Some(chain) = body.get("chain").and_then(Value::as_str) else {
            return;
        };
        let key = chain_key(family, chain);
        let Some(exprs) = body.get("expr").and_then(Value::as_array) else {
            return;
        };
        if is_service_chain(chain) {
            for e in exprs {
                match verdict(e) {
                    Verdict::Chain(t) if t.starts_with("endpoint-") || is_service_chain(&t) => {
                        let t = chain_key(family, &t);
                        self.jumps.entry(key.clone()).or_default().push(t);
                    }
                    _ => {}
                }
                // numgen random mod N vmap { 0 : goto endpoint-…, … }
                let arms = e
                    .get("vmap")
                    .and_then(|m| m.get("data"))
                    .and_then(|d| d.get("set"))
                    .and_then(Value::as_array);
                for arm in arms.into_iter().flatten() {
                    if let Some([_, v]) = arm.as_array().map(Vec::as_slice)
                        && let Verdict::Chain(t) = verdict(v)
                    {
                        let t = chain_key(family, &t);
                        self.jumps.entry(key.clone()).or_default().push(t);
                    }
                }
            }
        } else if chain.starts_with("endpoint-") {
            for e in exprs {
                let Some(d) = e.get("dnat") else { continue };
                let addr = d
                    .get("addr")
                    .and_then(Value::as_str)
                    .and_then(|a| a.parse().ok());
                let port = d.get("port").and_then(port);
                if let (Some(a), Some(p)) = (addr, port) {
                    self.dnat.insert(key.clone(), SocketAddr::new(a, p));
                }
            }
        }
    }

    pub fn finish(self) -> ServiceMap {
        let mut map = self.map;
        for entry in self.entries {
            let endpoints = endpoints_of(&entry.key, &self.jumps, &self.dnat);
            let service = service_of_chain(&entry.chain, entry.port);
            let e = match entry.addr {
                Some(a) => map.by_addr.entry((a, entry.port, entry.proto)).or_default(),
                None => map.node_ports.entry((entry.port, entry.proto)).or_default(),
            };
            e.service = service;
            e.endpoints = endpoints;
        }
        // Addresses kube-proxy was told to answer NodePorts on; otherwise
        // the reader fills in every local address.
        map.local_addrs = self.nodeport_ips;
        map
    }
}

/// The top-level object: `{"nftables": [...]}`; true when the array was there.
struct Listing<'a>(&'a mut Builder);

impl<'de> serde::de::DeserializeSeed<'de> for Listing<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Listing<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object with an \"nftables\" array")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<bool, A::Error> {
        let mut found = false;
        while let Some(k) = m.next_key::<std::borrow::Cow<'de, str>>()? {
            if k == "nftables" && !found {
                m.next_value_seed(Items(&mut *self.0))?;
                found = true;
            } else {
                m.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// The `nftables` array, fed to the builder object by object.
struct Items<'a>(&'a mut Builder);

impl<'de> serde::de::DeserializeSeed<'de> for Items<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Items<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("the \"nftables\" array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<Value>()? {
            self.0.item(&item);
        }
        Ok(())
    }
}

/// A [`ServiceMap`] from listings of the `ip` and `ip6` tables (either may be absent).
pub fn parse(listings: &[&[u8]]) -> Result<(ServiceMap, bool), NftError> {
    let mut b = Builder::default();
    for l in listings {
        b.listing(l)?;
    }
    let has = b.has_kube_table;
    Ok((b.finish(), has))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::service_map::svc;

    /// kube-proxy's own expected rules for its overall nftables test, loaded
    /// into a kernel and listed with `nft -j` (source and renumbering in
    /// the fixture's `.nft` beside it).
    const UPSTREAM: &[u8] =
        include_bytes!("../../tests/fixtures/kube-proxy-upstream-nftables.json");

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_kube_proxys_nftables_rules() {
        let (map, has) = parse(&[UPSTREAM]).unwrap();
        assert!(has);
        // ClusterIP: service-ips → service-… → numgen vmap → endpoint-… dnat.
        let c = map.lookup(6, ep("198.19.0.41:80")).expect("ClusterIP");
        assert_eq!(c.service, svc("ns1", "svc1", "p80"));
        assert_eq!(c.endpoints, [ep("198.18.180.1:80")]);
        assert!(!c.no_endpoints);
        // Two endpoints, in the vmap's order.
        let two = map.lookup(6, ep("198.19.0.44:80")).unwrap();
        assert_eq!(
            two.endpoints,
            [ep("198.18.180.4:80"), ep("198.18.180.5:80")]
        );
        // External IP through external-… to service-….
        let ext = map.lookup(6, ep("198.19.99.33:80")).unwrap();
        assert_eq!(ext.service, svc("ns4", "svc4", "p80"));
        assert_eq!(ext.endpoints, two.endpoints);
        // Load-balancer IP with source ranges and session affinity.
        let lb = map.lookup(6, ep("198.19.98.8:80")).unwrap();
        assert_eq!(lb.service, svc("ns5", "svc5", "p80"));
        assert_eq!(lb.endpoints, [ep("198.18.180.3:80")]);
        // No endpoints: rejected (goto reject-chain), named by the element's comment.
        let none = map.lookup(6, ep("198.19.0.46:80")).unwrap();
        assert!(none.no_endpoints && none.endpoints.is_empty());
        assert_eq!(none.service, svc("ns6", "svc6", "p80"));
        // externalTrafficPolicy Local without local endpoints: the external
        // IP drops, the ClusterIP still forwards.
        let local_ext = map.lookup(6, ep("198.19.99.22:80")).unwrap();
        assert!(local_ext.no_endpoints);
        assert_eq!(local_ext.endpoints, [ep("198.18.180.2:80")]);
        assert!(!map.lookup(6, ep("198.19.0.42:80")).unwrap().no_endpoints);
        // NodePorts answer on nodeport-ips only.
        assert_eq!(
            map.local_addrs,
            HashSet::from(["198.18.0.2".parse().unwrap()])
        );
        let np = map.lookup(6, ep("198.18.0.2:3003")).expect("NodePort");
        assert_eq!(np.service, svc("ns3", "svc3", "p80"));
        assert_eq!(np.endpoints, [ep("198.18.180.3:80")]);
        let np_local = map.lookup(6, ep("198.18.0.2:3001")).unwrap();
        assert!(np_local.no_endpoints);
        assert!(map.lookup(6, ep("198.18.0.9:3003")).is_none());
        assert!(map.lookup(17, ep("198.19.0.41:80")).is_none());
        assert_eq!(map.node_ports.len(), 3);
    }

    #[test]
    fn reads_the_ip6_table_beside_the_ip_one() {
        let seed = include_bytes!("../../../fuzz/corpus/nft_json/ip-and-ip6.bin");
        let parts: Vec<&[u8]> = seed.splitn(2, |b| *b == 0).collect();
        let (map, _) = parse(&parts).unwrap();
        let v6 = map
            .lookup(6, ep("[2001:db8::41]:80"))
            .expect("the ip6 ClusterIP");
        assert_eq!(v6.service, svc("ns1", "svc1", "p80"));
        assert_eq!(v6.endpoints, [ep("[2001:db8::1]:80")]);
        // An unnamed port without endpoints: the comment is `ns/svc`.
        let none = map.lookup(17, ep("[2001:db8::46]:53")).unwrap();
        assert!(none.no_endpoints);
        assert_eq!(none.service, svc("ns6", "svc6", "53"));
        // The ip table is read too.
        assert!(map.lookup(6, ep("198.19.0.41:80")).is_some());
    }

    #[test]
    fn unnamed_ports_and_chain_names() {
        assert_eq!(
            service_of_chain("service-ABCDEFGH-shop/cart-api/tcp/", 8080),
            svc("shop", "cart-api", "8080")
        );
        assert_eq!(
            service_of_chain("endpoint-ABCDEFGH-ns/a-b/udp/dns__198.18.0.3/53", 53),
            svc("ns", "a-b", "dns")
        );
        assert_eq!(
            service_of_chain("local-ABCDEFGH-ns/web/tcp/http", 80),
            svc("ns", "web", "http")
        );
        assert_eq!(service_of_chain("services", 80), None);
        assert_eq!(service_of_chain("service-endpoints-check", 80), None);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(parse(&[b"{"]), Err(NftError::NotJson(_))));
        assert_eq!(parse(&[b"{}"]).err(), Some(NftError::NoArray));
        let (map, has) = parse(&[br#"{"nftables":[{"map":{"table":"kube-proxy","name":"service-ips","elem":[[{"concat":["x","tcp",80]},{"goto":{"target":"service-A-a/b/tcp/"}}],[1,2],[{"concat":["198.19.0.1","tcp",99999]},{"drop":null}]]}}]}"#]).unwrap();
        assert!(has && map.is_empty());
    }
}
