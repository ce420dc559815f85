//! The Service map: what kube-proxy's rules say about each Service address
//! and NodePort, whichever mode wrote them (the iptables and nftables readers
//! both fill it), and the addresses where a NodePort answers.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use crate::probes::net::proto_name;

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
    /// Where a NodePort answers: kube-proxy's `nodeport-ips` set in
    /// nftables mode when it names addresses, else every address of the
    /// rules' network namespace, filled by the rules reader, `deps::rules`
    /// (kube-proxy's default `--nodeport-addresses` in iptables mode: all).
    pub local_addrs: HashSet<IpAddr>,
}

/// `ns/svc:port` (or `ns/svc`) → the Service; `port` is the number when unnamed.
pub(super) fn service_ref(name: &str, port: u16) -> Option<ServiceRef> {
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

/// The DNAT targets reached from a Service's chain, in rule (or vmap)
/// order, following its jumps depth-first, each chain once (iptables:
/// KUBE-FW → KUBE-EXT → KUBE-SVC/KUBE-SVL → KUBE-SEP; nftables: external-
/// → service- → endpoint-). Jumps to chains that lead nowhere (masquerade
/// marks) end there.
pub(super) fn endpoints_of(
    chain: &str,
    jumps: &HashMap<String, Vec<String>>,
    dnat: &HashMap<String, SocketAddr>,
) -> Vec<SocketAddr> {
    let mut out = vec![];
    let mut visited = HashSet::new();
    let mut stack = vec![chain.to_string()];
    // Depth-first in rule order: push targets reversed.
    while let Some(c) = stack.pop() {
        if !visited.insert(c.clone()) {
            continue;
        }
        if let Some(to) = dnat.get(&c) {
            if !out.contains(to) {
                out.push(*to);
            }
            continue;
        }
        if let Some(targets) = jumps.get(&c) {
            stack.extend(targets.iter().rev().cloned());
        }
    }
    out
}

/// A Service port by its names (tests).
#[cfg(test)]
pub(crate) fn svc(ns: &str, name: &str, port: &str) -> Option<ServiceRef> {
    Some(ServiceRef {
        namespace: ns.into(),
        name: name.into(),
        port: port.into(),
    })
}

impl ServiceMap {
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
