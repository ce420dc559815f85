//! Packet paths through kube-proxy's rules:
//! - `podscope_service_connections_total{namespace,pod,service_namespace,service,port,outcome}`
//!   (outcome `forwarded`, `forwarded_to_terminating_endpoint`,
//!   `rejected_no_endpoints`, `dropped`; the client pod;
//!   empty namespace and pod for the host or an unknown source);
//! - `podscope_service_endpoint_connections_total{service_namespace,service,endpoint}`
//!   (the real split among endpoints; `endpoint` is `ip:port`);
//! - `podscope_service_connections_to_terminating_total{service_namespace,service,namespace,pod}`
//!   (new connections DNATed to an endpoint pod after one of its containers
//!   got SIGTERM or exited; namespace and pod are the endpoint's);
//! - `podscope_packet_drops_total{namespace,pod,reason}` (the kernel's drop
//!   reason names; drops attributed to a pod by the packet's source address).
//!
//! - `podscope_service_rules_errors_total`: failed reads of kube-proxy's
//!   rules (iptables-save missing, CAP_NET_ADMIN missing, or failing).
//!
//! Traffic that touches no Service is not counted as Service traffic.

use std::{sync::Arc, time::Instant};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{MetricsOptions, SeriesBook};
use crate::net::{Connection, Outcome, PacketDrop};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceConnLabels {
    pub namespace: Arc<str>,
    pub pod: Arc<str>,
    pub service_namespace: String,
    pub service: String,
    pub port: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service_namespace: String,
    pub service: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TerminatingLabels {
    pub service_namespace: String,
    pub service: String,
    /// The endpoint pod.
    pub namespace: String,
    pub pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub namespace: Arc<str>,
    pub pod: Arc<str>,
    pub reason: String,
}

pub struct NetMetrics {
    conns: Family<ServiceConnLabels, Counter>,
    endpoints: Family<EndpointLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    terminating: Family<TerminatingLabels, Counter>,
    terminating_book: SeriesBook<TerminatingLabels>,
    conn_book: SeriesBook<ServiceConnLabels>,
    endpoint_book: SeriesBook<EndpointLabels>,
    drop_book: SeriesBook<DropLabels>,
    rules_errors: Counter,
    rules_errors_seen: u64,
}

impl NetMetrics {
    pub fn register(registry: &mut Registry, opts: &MetricsOptions) -> NetMetrics {
        let conns = Family::<ServiceConnLabels, Counter>::default();
        registry.register(
            "service_connections",
            "New connections to Services, by client pod and outcome: forwarded (DNAT to an endpoint), rejected_no_endpoints (kube-proxy's REJECT for a Service without endpoints), dropped",
            conns.clone(),
        );
        let endpoints = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "service_endpoint_connections",
            "New connections forwarded to each endpoint (ip:port) of a Service: the real split among endpoints",
            endpoints.clone(),
        );
        let terminating = Family::<TerminatingLabels, Counter>::default();
        registry.register(
            "service_connections_to_terminating",
            "New connections DNATed to an endpoint pod after one of its containers got SIGTERM (or exited): endpoint removal had not caught up with termination (preStop sleep shorter than the propagation)",
            terminating.clone(),
        );
        let drops = Family::<DropLabels, Counter>::default();
        registry.register(
            "packet_drops",
            "Packets the kernel dropped, by sending pod and the kernel's drop reason (enum skb_drop_reason)",
            drops.clone(),
        );
        let rules_errors = Counter::default();
        registry.register(
            "service_rules_errors",
            "Failed reads of kube-proxy's rules (iptables-save not installed, no CAP_NET_ADMIN, or failing): connections then carry no Service",
            rules_errors.clone(),
        );
        NetMetrics {
            rules_errors,
            rules_errors_seen: 0,
            conns,
            endpoints,
            drops,
            terminating,
            terminating_book: SeriesBook::new(&opts.budget, opts.series_retention),
            conn_book: SeriesBook::new(&opts.budget, opts.series_retention),
            endpoint_book: SeriesBook::new(&opts.budget, opts.series_retention),
            drop_book: SeriesBook::new(&opts.budget, opts.series_retention),
        }
    }

    /// The rule reader's failure count so far.
    pub fn update_rules(&mut self, errors: u64) {
        if errors > self.rules_errors_seen {
            self.rules_errors.inc_by(errors - self.rules_errors_seen);
            self.rules_errors_seen = errors;
        }
    }

    pub fn observe_connection(&mut self, c: &Connection, now: Instant, refused: &Counter) {
        let Some(svc) = &c.service else { return };
        let labels = ServiceConnLabels {
            namespace: c.pod.namespace.clone().unwrap_or_default(),
            pod: c.pod.pod.clone().unwrap_or_default(),
            service_namespace: svc.namespace.clone(),
            service: svc.name.clone(),
            port: svc.port.clone(),
            outcome: c.outcome.as_str().to_string(),
        };
        if self.conn_book.admit(&labels, now, refused) {
            self.conns.get_or_create(&labels).inc();
        }
        if let (Outcome::ForwardedToTerminating, Some(ep)) = (c.outcome, &c.endpoint_pod) {
            let labels = TerminatingLabels {
                service_namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                namespace: ep.namespace.clone(),
                pod: ep.pod.clone(),
            };
            if self.terminating_book.admit(&labels, now, refused) {
                self.terminating.get_or_create(&labels).inc();
            }
        }
        if let (true, Some(ep)) = (c.outcome.forwarded(), c.endpoint) {
            let labels = EndpointLabels {
                service_namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                endpoint: ep.to_string(),
            };
            if self.endpoint_book.admit(&labels, now, refused) {
                self.endpoints.get_or_create(&labels).inc();
            }
        }
    }

    pub fn observe_drop(&mut self, d: &PacketDrop, now: Instant, refused: &Counter) {
        let labels = DropLabels {
            namespace: d.pod.namespace.clone().unwrap_or_default(),
            pod: d.pod.pod.clone().unwrap_or_default(),
            reason: d.reason.clone(),
        };
        if self.drop_book.admit(&labels, now, refused) {
            self.drops.get_or_create(&labels).inc();
        }
    }

    /// Forgets the series of pods gone for longer than the retention, and
    /// endpoints not used for as long.
    pub fn gc(&mut self, now: Instant, gone: impl Fn(&str, &str) -> bool) {
        for l in self
            .conn_book
            .expire(now, |l| !l.pod.is_empty() && gone(&l.namespace, &l.pod))
        {
            self.conns.remove(&l);
        }
        for l in self
            .drop_book
            .expire(now, |l| !l.pod.is_empty() && gone(&l.namespace, &l.pod))
        {
            self.drops.remove(&l);
        }
        for l in self
            .terminating_book
            .expire(now, |l| gone(&l.namespace, &l.pod))
        {
            self.terminating.remove(&l);
        }
        for l in self.endpoint_book.expire(now, |_| true) {
            self.endpoints.remove(&l);
        }
    }

    pub fn series(&self) -> usize {
        self.conn_book.len()
            + self.endpoint_book.len()
            + self.drop_book.len()
            + self.terminating_book.len()
    }
}
