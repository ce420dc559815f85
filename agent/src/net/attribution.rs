//! Attribution: what the packet probes saw (a new connection's tuples, a
//! drop), turned into events that name the client pod, the Service, the
//! endpoint DNAT chose and that endpoint's pod, from the Service map.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use super::service_map::{ServiceMap, ServiceRef};
use crate::{
    metadata::PodIdentity,
    probes::net::{RawConn, RawDrop, Tuple, proto_name},
};

/// What happened to a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Forwarded,
    /// Forwarded to an endpoint whose container already got SIGTERM (or
    /// exited): endpoint removal had not caught up ([`super::dying`]).
    #[serde(rename = "forwarded_to_terminating_endpoint")]
    ForwardedToTerminating,
    RejectedNoEndpoints,
    Dropped,
}

impl Outcome {
    /// DNAT sent it to an endpoint.
    pub fn forwarded(self) -> bool {
        matches!(self, Outcome::Forwarded | Outcome::ForwardedToTerminating)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::ForwardedToTerminating => "forwarded_to_terminating_endpoint",
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
    /// Connections remembered, and their order queue's length.
    pub fn entries(&self) -> (usize, usize) {
        (self.at.len(), self.order.len())
    }

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
        namespace: p.namespace?.to_string(),
        pod: p.pod?.to_string(),
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
    use crate::net::service_map::svc;

    const UPSTREAM: &str = include_str!("../../tests/fixtures/kube-proxy-upstream-nodeports.txt");

    #[test]
    fn a_connection_to_a_nodeport_is_attributed_to_its_service() {
        let mut map = super::super::iptables::parse(UPSTREAM);
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
