//! Connections that reach a dying endpoint. Endpoint removal lags behind
//! termination: kubelet sends SIGTERM as soon as the pod is deleted (after
//! its preStop hook), while kube-proxy drops the endpoint only once the
//! EndpointSlice change has reached it. A new connection DNATed to a pod
//! whose container already got SIGTERM (or has exited) meanwhile goes to a
//! process that is shutting down: the reason for `sleep` in preStop.
//!
//! The drain thread feeds this tracker the SIGTERMs to containers and their
//! main exits (the forensics' signal and termination events), and each
//! forwarded connection: one DNATed to such a pod is re-labelled
//! [`Outcome::ForwardedToTerminating`], counted per pod, and the count is
//! attached to the pod's termination records ([`LateConnections`]), which
//! `podscope why` shows.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::attribution::{Connection, Outcome};
use crate::metadata::PodIdentity;

/// New connections a container's pod received after its SIGTERM, as its
/// termination record keeps them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LateConnections {
    /// New connections DNATed to the pod after the first SIGTERM to one of
    /// its containers (or after a container exited).
    pub count: u64,
    /// From the last of them to this container's exit (negative: after it).
    pub last_before_exit_seconds: f64,
}

/// What is known of one pod that is going away.
#[derive(Debug, Default)]
struct Dying {
    /// The first SIGTERM to one of its containers.
    sigterm_at: Option<SystemTime>,
    /// The first exit of one of its containers' main processes.
    exited_at: Option<SystemTime>,
    late: u64,
    last_late: Option<SystemTime>,
}

impl Dying {
    fn since(&self) -> Option<SystemTime> {
        match (self.sigterm_at, self.exited_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Pods whose containers got SIGTERM or exited, by namespace and name.
/// Bounded: at most `cap` pods; the oldest are forgotten first.
pub struct DyingEndpoints {
    pods: HashMap<(String, String), Dying>,
    cap: usize,
    /// How long a dying pod is remembered (its IP may be reused after).
    keep: Duration,
}

fn key(pod: &PodIdentity) -> Option<(String, String)> {
    Some((pod.namespace.as_deref()?.into(), pod.pod.as_deref()?.into()))
}

impl DyingEndpoints {
    pub fn new(cap: usize, keep: Duration) -> DyingEndpoints {
        DyingEndpoints {
            pods: HashMap::new(),
            cap,
            keep,
        }
    }

    fn entry(&mut self, k: (String, String)) -> &mut Dying {
        if !self.pods.contains_key(&k) && self.pods.len() >= self.cap {
            // The pod that started dying first is the one to forget.
            if let Some(oldest) = self
                .pods
                .iter()
                .min_by_key(|(_, d)| d.since())
                .map(|(k, _)| k.clone())
            {
                self.pods.remove(&oldest);
            }
        }
        self.pods.entry(k).or_default()
    }

    /// A SIGTERM to a process of a container.
    pub fn on_sigterm(&mut self, target: &PodIdentity, at: SystemTime) {
        let Some(k) = key(target) else { return };
        let d = self.entry(k);
        d.sigterm_at = Some(d.sigterm_at.map_or(at, |s| s.min(at)));
    }

    /// A container's main process exited.
    pub fn on_exit(&mut self, pod: &PodIdentity, at: SystemTime) {
        let Some(k) = key(pod) else { return };
        let d = self.entry(k);
        d.exited_at = Some(d.exited_at.map_or(at, |s| s.min(at)));
    }

    /// A container started in the pod: whatever ended before (a restart
    /// after a crash or a failed liveness probe) is over.
    pub fn on_start(&mut self, pod: &PodIdentity) {
        if let Some(k) = key(pod) {
            self.pods.remove(&k);
        }
    }

    /// Re-labels a forwarded connection whose endpoint pod is dying.
    pub fn classify(&mut self, conn: &mut Connection) {
        if conn.outcome != Outcome::Forwarded {
            return;
        }
        let Some(ep) = &conn.endpoint_pod else { return };
        let Some(d) = self.pods.get_mut(&(ep.namespace.clone(), ep.pod.clone())) else {
            return;
        };
        if d.since().is_some_and(|s| s <= conn.ts) {
            conn.outcome = Outcome::ForwardedToTerminating;
            d.late += 1;
            d.last_late = Some(d.last_late.map_or(conn.ts, |l| l.max(conn.ts)));
        }
    }

    /// The late connections of a container's pod, for its termination
    /// record (None when there were none).
    pub fn late_connections(
        &self,
        pod: &PodIdentity,
        finished_at: SystemTime,
    ) -> Option<LateConnections> {
        let d = self.pods.get(&key(pod)?)?;
        let last = d.last_late?;
        let before = match finished_at.duration_since(last) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        Some(LateConnections {
            count: d.late,
            last_before_exit_seconds: before,
        })
    }

    /// Forgets pods that started dying longer ago than `keep`.
    pub fn gc(&mut self, now: SystemTime) {
        let keep = self.keep;
        self.pods.retain(|_, d| {
            d.since()
                .is_none_or(|s| now.duration_since(s).unwrap_or_default() < keep)
        });
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::attribution::PodRef;

    fn pod(name: &str) -> PodIdentity {
        PodIdentity {
            namespace: Some("shop".into()),
            pod: Some(name.into()),
            ..PodIdentity::default()
        }
    }

    fn conn(to: &str, at: SystemTime) -> Connection {
        Connection {
            ts: at,
            protocol: "tcp",
            src: "198.18.0.9:40000".parse().unwrap(),
            dst: "198.19.0.10:80".parse().unwrap(),
            endpoint: Some("198.18.0.3:8080".parse().unwrap()),
            endpoint_pod: Some(PodRef {
                namespace: "shop".into(),
                pod: to.into(),
            }),
            service: None,
            outcome: Outcome::Forwarded,
            reason: None,
            pod: PodIdentity::default(),
        }
    }

    #[test]
    fn counts_connections_after_sigterm_until_a_restart() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut d = DyingEndpoints::new(8, Duration::from_secs(600));
        let mut before = conn("web-a", at(0));
        d.on_sigterm(&pod("web-a"), at(100));
        d.classify(&mut before);
        assert_eq!(before.outcome, Outcome::Forwarded, "before SIGTERM");
        let mut other = conn("web-b", at(200));
        d.classify(&mut other);
        assert_eq!(other.outcome, Outcome::Forwarded, "another pod");
        for ms in [200, 300, 1200] {
            let mut c = conn("web-a", at(ms));
            d.classify(&mut c);
            assert_eq!(c.outcome, Outcome::ForwardedToTerminating);
        }
        let late = d.late_connections(&pod("web-a"), at(2000)).unwrap();
        assert_eq!(late.count, 3);
        assert!(
            (late.last_before_exit_seconds - 0.8).abs() < 1e-9,
            "{late:?}"
        );
        assert_eq!(d.late_connections(&pod("web-b"), at(2000)), None);
        // A container started again: connections are ordinary again.
        d.on_start(&pod("web-a"));
        let mut after = conn("web-a", at(3000));
        d.classify(&mut after);
        assert_eq!(after.outcome, Outcome::Forwarded);
    }

    #[test]
    fn an_exited_container_counts_too_and_memory_is_bounded() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut d = DyingEndpoints::new(2, Duration::from_secs(60));
        d.on_exit(&pod("a"), t0);
        let mut c = conn("a", t0 + Duration::from_secs(1));
        d.classify(&mut c);
        assert_eq!(c.outcome, Outcome::ForwardedToTerminating);
        d.on_sigterm(&pod("b"), t0 + Duration::from_secs(2));
        d.on_sigterm(&pod("c"), t0 + Duration::from_secs(3));
        assert_eq!(d.len(), 2, "the oldest is forgotten");
        d.gc(t0 + Duration::from_secs(62));
        assert_eq!(d.len(), 1);
        d.on_sigterm(&PodIdentity::default(), t0);
        assert_eq!(d.len(), 1, "host processes are not endpoints");
    }
}
