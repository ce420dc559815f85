//! Network probes (httpGet, tcpSocket) as evidence for why the runtime
//! stopped a container.
//!
//! kubelet makes these probes as TCP connections from the node (its own
//! network namespace) to the pod's IP and the probe's port. The agent's
//! packet events already show them: a new connection (`Event::Connection`,
//! the netfilter program) and, when the pod's kernel had no listener, the
//! SYN dropped there with the kernel's reason `NO_SOCKET` (`Event::Drop`,
//! kfree_skb) while it answers RST — a refusal. This module only consumes
//! those published events (it does not touch the packet probes) and keeps,
//! per pod, the recent TCP connections to the pod's address from a source
//! that is no pod of this node.
//!
//! What is observed and what is not: the kernel events show that a
//! connection was made, refused (`NO_SOCKET`) or dropped (another reason,
//! e.g. a NetworkPolicy's `NETFILTER_DROP`: the probe then times out). They
//! do not carry the reply direction, so a connection that was neither
//! refused nor dropped is `not_refused`: the pod's kernel took it (a
//! listener existed), whether the server then answered, and with which
//! HTTP status, is not seen. Reading the status would mean capturing
//! payload of every connection to every pod, on the hot path, for a field
//! whose absence the restart pattern already explains; so a probe that
//! connects and then fails (HTTP 500, a server that accepts and never
//! answers) is reported as `not_refused` connections, and the probe failure
//! is inferred from the stop that follows (a new container in the same pod).

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{
    record::time,
    trigger::{Basis, Trigger, TriggerInfo},
};

/// Connections kept per pod (a probe every second: half a minute of one
/// probe, or a few probes' worth).
const KEPT_PER_POD: usize = 32;
/// Pods followed at most; beyond, the table starts over (a burst of new
/// pods cannot grow it).
const PODS_KEPT: usize = 4096;
/// Connections this long before the stop can still be the failing probe
/// (periods are seconds; the failure threshold a few periods).
const WINDOW: Duration = Duration::from_secs(30);
/// The kernel's reason for a segment to a port with no socket: the pod's
/// kernel answered RST, the client saw "connection refused".
const REFUSED_REASON: &str = "NO_SOCKET";
/// Reasons that stop a connection on its way (a rule, no route, no
/// neighbour): the client waits for its timeout. Other reasons (`TCP_CLOSE`
/// for a segment that arrives after its socket closed, checksum and
/// out-of-order drops) happen to connections that were answered, so they
/// say nothing about the probe.
const BLOCKING_REASONS: &[&str] = &[
    "NETFILTER_DROP",
    "IP_OUTNOROUTES",
    "IP_INNOROUTES",
    "NEIGH_FAILED",
    "NEIGH_QUEUEFULL",
    "NEIGH_DEAD",
];

/// What happened to one connection, as far as the kernel events show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnOutcome {
    /// No socket listened on the port: the pod's kernel dropped the SYN
    /// (`NO_SOCKET`) and answered RST.
    Refused,
    /// Dropped on the way with another reason (the client times out).
    Dropped,
    /// Neither refused nor dropped: the pod's kernel took it. Whether the
    /// server answered is not seen.
    NotRefused,
}

impl ConnOutcome {
    fn failed(self) -> bool {
        self != ConnOutcome::NotRefused
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnOutcome::Refused => "refused",
            ConnOutcome::Dropped => "dropped",
            ConnOutcome::NotRefused => "not refused",
        }
    }
}

/// One connection to the pod's address from outside the node's pods.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeConnection {
    #[serde(with = "time")]
    pub at: SystemTime,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub outcome: ConnOutcome,
    /// The kernel's drop reason when it was refused or dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The recent connections to each pod's address, by pod uid.
#[derive(Default)]
pub struct NetProbes {
    pods: HashMap<String, VecDeque<ProbeConnection>>,
}

impl NetProbes {
    /// Pods with connections remembered, and the connections.
    pub fn entries(&self) -> (usize, usize) {
        (self.pods.len(), self.pods.values().map(VecDeque::len).sum())
    }

    /// A new TCP connection from `src` (no pod of this node) to pod `uid`'s
    /// address `dst`.
    pub fn connection(&mut self, uid: &str, at: SystemTime, src: SocketAddr, dst: SocketAddr) {
        self.record(uid, at, (src, dst), ConnOutcome::NotRefused, None);
    }

    /// A TCP segment from `src` to pod `uid`'s `dst` dropped with `reason`:
    /// the connection it belongs to failed (its connection event may come
    /// after it, from another ring buffer: the drop is kept either way).
    pub fn drop(
        &mut self,
        uid: &str,
        at: SystemTime,
        src: SocketAddr,
        dst: SocketAddr,
        reason: &str,
    ) {
        let outcome = if reason == REFUSED_REASON {
            ConnOutcome::Refused
        } else if BLOCKING_REASONS.contains(&reason) {
            ConnOutcome::Dropped
        } else {
            return;
        };
        self.record(uid, at, (src, dst), outcome, Some(reason));
    }

    /// Adds a connection, or marks the one of the same addresses failed.
    fn record(
        &mut self,
        uid: &str,
        at: SystemTime,
        (src, dst): (SocketAddr, SocketAddr),
        outcome: ConnOutcome,
        reason: Option<&str>,
    ) {
        let list = self.list(uid);
        match list.iter_mut().find(|c| c.src == src && c.dst == dst) {
            Some(c) if outcome.failed() => {
                c.outcome = outcome;
                c.reason = reason.map(str::to_string);
            }
            Some(_) => {}
            None => {
                if list.len() == KEPT_PER_POD {
                    list.pop_front();
                }
                list.push_back(ProbeConnection {
                    at,
                    src,
                    dst,
                    outcome,
                    reason: reason.map(str::to_string),
                });
            }
        }
    }

    fn list(&mut self, uid: &str) -> &mut VecDeque<ProbeConnection> {
        if self.pods.len() >= PODS_KEPT && !self.pods.contains_key(uid) {
            self.pods.clear();
        }
        self.pods.entry(uid.to_string()).or_default()
    }

    /// The connections to the pod's busiest probed port up to `before` (the
    /// moment kubelet began the kill), within the window, oldest first.
    /// `ports`: the container's declared ports when CRI gave them, so a
    /// probe of another container of the pod is not taken for this one's.
    pub fn before(&self, uid: &str, before: SystemTime, ports: &[u16]) -> Vec<ProbeConnection> {
        let Some(list) = self.pods.get(uid) else {
            return vec![];
        };
        let recent: Vec<&ProbeConnection> = list
            .iter()
            .filter(|c| c.at <= before)
            .filter(|c| before.duration_since(c.at).is_ok_and(|d| d <= WINDOW))
            .collect();
        // A probe may target a port the container does not declare: the
        // declared ones narrow the choice only when they were connected to.
        let declared: Vec<&ProbeConnection> = recent
            .iter()
            .copied()
            .filter(|c| ports.contains(&c.dst.port()))
            .collect();
        let recent = if declared.is_empty() {
            recent
        } else {
            declared
        };
        // The port of the newest connection: the probe that ran last.
        let Some(port) = recent.iter().max_by_key(|c| c.at).map(|c| c.dst) else {
            return vec![];
        };
        let mut same: Vec<ProbeConnection> = recent
            .into_iter()
            .filter(|c| c.dst == port)
            .cloned()
            .collect();
        same.sort_by_key(|c| c.at);
        same
    }

    /// Forgets the pods with no connection within the window.
    pub fn gc(&mut self, now: SystemTime) {
        self.pods.retain(|_, l| {
            l.back()
                .is_some_and(|c| now.duration_since(c.at).map_or(true, |d| d <= WINDOW))
        });
    }
}

/// The trigger the network evidence gives to a runtime stop that was
/// followed by a new container in the same pod (a stop the exec probes do
/// not explain): `conns` from [`NetProbes::before`], `kill` the moment
/// kubelet began the kill (the preStop hook's start, else SIGTERM).
pub fn trigger(conns: &[ProbeConnection], kill: SystemTime) -> Option<TriggerInfo> {
    let last = conns.last()?;
    let trailing: Vec<&ProbeConnection> = conns
        .iter()
        .rev()
        .take_while(|c| c.outcome.failed() == last.outcome.failed())
        .collect();
    let n = trailing.len();
    let gap = kill
        .duration_since(last.at)
        .map_or(0.0, |d| d.as_secs_f64());
    let s = if n == 1 { "" } else { "s" };
    let from = last.src.ip();
    if last.outcome.failed() {
        let succeeded_before = conns.iter().any(|c| !c.outcome.failed());
        let how = match last.outcome {
            ConnOutcome::Refused => "refused (the pod's kernel had no listener on the port: NO_SOCKET, answered with RST)".to_string(),
            _ => format!(
                "dropped on the way ({}): the client times out",
                last.reason.as_deref().unwrap_or("?")
            ),
        };
        let (trigger, basis, what) = if succeeded_before {
            (
                Trigger::LivenessProbe,
                Basis::Observed,
                "earlier ones were not refused",
            )
        } else {
            (
                Trigger::StartupProbe,
                Basis::Inferred,
                "none was taken before: a startup probe that never succeeded",
            )
        };
        return Some(TriggerInfo {
            trigger,
            basis,
            evidence: format!(
                "{n} connection{s} to {} from {from} (no pod: the node, where kubelet's httpGet and tcpSocket probes come from) {how}, the last {gap:.1} s before the kill; {what}",
                last.dst
            ),
            probe_failures: vec![],
            probe_connections: conns.to_vec(),
            decided: true,
        });
    }
    // Connections the pod took: a probe that connected and then failed (an
    // HTTP error status, no answer in time) looks the same from the kernel.
    Some(TriggerInfo {
        trigger: Trigger::LivenessProbe,
        basis: Basis::Inferred,
        evidence: format!(
            "{n} connection{s} to {} from {from} (no pod: the node, where kubelet's probes come from) were {}, the last {gap:.1} s before the kill, and the runtime then started a new container in the same pod: an httpGet probe that connected and failed (an HTTP error status or no answer in time; the kernel does not show the answer)",
            last.dst,
            last.outcome.as_str()
        ),
        probe_failures: vec![],
        probe_connections: conns.to_vec(),
        decided: true,
    })
}

/// The container's declared TCP ports, from kubelet's
/// `io.kubernetes.container.ports` annotation (JSON list of ContainerPort).
pub fn declared_ports(annotation: Option<&str>) -> Vec<u16> {
    let Some(json) = annotation else {
        return vec![];
    };
    let Ok(serde_json::Value::Array(ports)) = serde_json::from_str(json) else {
        return vec![];
    };
    ports
        .iter()
        .filter(|p| {
            p.get("protocol")
                .and_then(|v| v.as_str())
                .is_none_or(|v| v.eq_ignore_ascii_case("tcp"))
        })
        .filter_map(|p| p.get("containerPort")?.as_u64())
        .filter_map(|p| u16::try_from(p).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "uid-1";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refusals_after_taken_connections_are_a_liveness_probe() {
        let t0 = SystemTime::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut p = NetProbes::default();
        let dst = addr("198.18.0.5:8080");
        for (i, port) in [40001u16, 40002, 40003, 40004].into_iter().enumerate() {
            let src = SocketAddr::new("198.18.0.1".parse().unwrap(), port);
            // The drop may be read before its connection.
            if i >= 2 {
                p.drop(UID, at(i as u64), src, dst, "NO_SOCKET");
            }
            p.connection(UID, at(i as u64), src, dst);
        }
        // A segment after an answered connection closed says nothing.
        p.drop(UID, at(1), addr("198.18.0.1:40002"), dst, "TCP_CLOSE");
        // Another port of the pod, seen earlier, is not this probe.
        p.connection(
            UID,
            at(0),
            addr("198.18.0.1:40100"),
            addr("198.18.0.5:9090"),
        );
        let conns = p.before(UID, at(4), &[]);
        assert_eq!(conns.len(), 4);
        let t = trigger(&conns, at(4)).unwrap();
        assert_eq!(t.trigger, Trigger::LivenessProbe);
        assert_eq!(t.basis, Basis::Observed);
        assert!(
            t.evidence.starts_with("2 connections to 198.18.0.5:8080"),
            "{}",
            t.evidence
        );
        assert!(t.evidence.contains("refused"), "{}", t.evidence);
        // A declared port narrows the choice.
        let declared = p.before(UID, at(4), &[9090]);
        assert!(!declared.is_empty() && declared.iter().all(|c| c.dst.port() == 9090));
        // Taken connections only: inferred from the restart.
        let mut q = NetProbes::default();
        q.connection(UID, at(0), addr("198.18.0.1:40001"), dst);
        let t = trigger(&q.before(UID, at(1), &[]), at(1)).unwrap();
        assert_eq!(t.basis, Basis::Inferred);
        assert!(t.evidence.contains("not refused"), "{}", t.evidence);
        // Nothing in the window: no evidence.
        assert!(p.before(UID, at(100), &[]).is_empty());
    }

    #[test]
    fn declared_ports_are_read_from_kubelets_annotation() {
        assert_eq!(
            declared_ports(Some(
                r#"[{"containerPort":8080,"protocol":"TCP"},{"containerPort":53,"protocol":"UDP"},{"name":"x","containerPort":9090}]"#
            )),
            vec![8080, 9090]
        );
        assert!(declared_ports(Some("not json")).is_empty());
        assert!(declared_ports(None).is_empty());
    }
}
