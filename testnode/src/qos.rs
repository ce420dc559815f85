//! Resources as kubelet computes them: quantities, the pod's QoS class, its
//! cgroup parent under the cgroupfs driver, and each container's
//! `LinuxContainerResources`. The formulas follow kubelet's
//! (`pkg/apis/core/v1/helper/qos`, `pkg/kubelet/cm/helpers_linux.go`,
//! `pkg/kubelet/qos/policy.go`) so podscope sees what a real node produces.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::manifest::{Container, Pod, ResourceList};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("cpu `{0}` is not a CPU quantity such as `200m`, `1` or `0.5`")]
    Cpu(String),
    #[error("memory `{0}` is not a memory quantity such as `64Mi`, `1Gi` or `128000000`")]
    Memory(String),
}

/// The kernel's CFS period kubelet always sets (100 ms).
pub const CPU_PERIOD_US: i64 = 100_000;
/// cgroup v1's smallest `cpu.shares`.
const MIN_SHARES: i64 = 2;
/// Kubernetes' smallest CFS quota (1 ms).
const MIN_QUOTA_US: i64 = 1_000;

/// Parses a CPU quantity into millicores: `200m`, `1`, `0.5`, `1.5`.
pub fn parse_cpu_millis(s: &str) -> Result<i64, QuantityError> {
    let err = || QuantityError::Cpu(s.to_string());
    let t = s.trim();
    let millis = if let Some(m) = t.strip_suffix('m') {
        m.parse::<i64>().map_err(|_| err())?
    } else {
        let v: f64 = t.parse().map_err(|_| err())?;
        if !v.is_finite() {
            return Err(err());
        }
        // Kubernetes rounds fractional millicores up.
        (v * 1000.0).ceil() as i64
    };
    if millis < 0 {
        return Err(err());
    }
    Ok(millis)
}

/// Parses a memory quantity into bytes: `64Mi`, `1Gi`, `128M`, `1e9`, `1000`.
pub fn parse_memory_bytes(s: &str) -> Result<i64, QuantityError> {
    let err = || QuantityError::Memory(s.to_string());
    let t = s.trim();
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(suf, f)| t.strip_suffix(suf).map(|n| (n, *f)))
        .unwrap_or((t, 1.0));
    let v: f64 = number.parse().map_err(|_| err())?;
    if !v.is_finite() || v < 0.0 {
        return Err(err());
    }
    Ok((v * factor).ceil() as i64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One container's CPU and memory, requests already defaulted from limits
/// (the API server does that before kubelet ever sees a pod).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerResources {
    pub cpu_request_millis: Option<i64>,
    pub cpu_limit_millis: Option<i64>,
    pub memory_request_bytes: Option<i64>,
    pub memory_limit_bytes: Option<i64>,
}

impl ContainerResources {
    pub fn of(c: &Container) -> Result<ContainerResources, QuantityError> {
        let empty = ResourceList::default();
        let res = c.resources.clone().unwrap_or_default();
        let req = res.requests.as_ref().unwrap_or(&empty);
        let lim = res.limits.as_ref().unwrap_or(&empty);
        let cpu = |q: &Option<String>| q.as_deref().map(parse_cpu_millis).transpose();
        let mem = |q: &Option<String>| q.as_deref().map(parse_memory_bytes).transpose();
        let cpu_limit_millis = cpu(&lim.cpu)?;
        let memory_limit_bytes = mem(&lim.memory)?;
        Ok(ContainerResources {
            cpu_request_millis: cpu(&req.cpu)?.or(cpu_limit_millis),
            cpu_limit_millis,
            memory_request_bytes: mem(&req.memory)?.or(memory_limit_bytes),
            memory_limit_bytes,
        })
    }

    /// `cpu.shares` from the request (kubelet's `MilliCPUToShares`).
    pub fn cpu_shares(&self) -> i64 {
        match self.cpu_request_millis {
            Some(m) if m > 0 => (m * 1024 / 1000).max(MIN_SHARES),
            _ => MIN_SHARES,
        }
    }

    /// The CFS quota from the limit (kubelet's `MilliCPUToQuota`); 0 means none.
    pub fn cpu_quota(&self) -> i64 {
        match self.cpu_limit_millis {
            Some(m) if m > 0 => (m * CPU_PERIOD_US / 1000).max(MIN_QUOTA_US),
            _ => 0,
        }
    }

    pub fn memory_limit(&self) -> i64 {
        self.memory_limit_bytes.unwrap_or(0)
    }
}

/// The pod's QoS class, as kubelet's `GetPodQOS`: BestEffort when nothing is
/// requested or limited, Guaranteed when every container limits both CPU
/// and memory and requests exactly its limits, Burstable otherwise.
pub fn qos_class(pod: &Pod) -> Result<QosClass, QuantityError> {
    // kubelet counts init containers too.
    let all: Vec<ContainerResources> = (pod.spec.containers.iter())
        .chain(&pod.spec.init_containers)
        .map(ContainerResources::of)
        .collect::<Result<_, _>>()?;
    let nonzero = |v: Option<i64>| v.is_some_and(|v| v > 0);
    let anything = all.iter().any(|r| {
        nonzero(r.cpu_request_millis)
            || nonzero(r.cpu_limit_millis)
            || nonzero(r.memory_request_bytes)
            || nonzero(r.memory_limit_bytes)
    });
    if !anything {
        return Ok(QosClass::BestEffort);
    }
    let guaranteed = all.iter().all(|r| {
        nonzero(r.cpu_limit_millis)
            && nonzero(r.memory_limit_bytes)
            && r.cpu_request_millis == r.cpu_limit_millis
            && r.memory_request_bytes == r.memory_limit_bytes
    });
    Ok(if guaranteed {
        QosClass::Guaranteed
    } else {
        QosClass::Burstable
    })
}

/// kubelet's cgroup parent for a pod under the cgroupfs driver.
pub fn cgroup_parent(qos: QosClass, uid: &str) -> String {
    match qos {
        QosClass::Guaranteed => format!("/kubepods/pod{uid}"),
        QosClass::Burstable => format!("/kubepods/burstable/pod{uid}"),
        QosClass::BestEffort => format!("/kubepods/besteffort/pod{uid}"),
    }
}

/// kubelet's `oom_score_adj` for a container (`GetContainerOOMScoreAdjust`).
/// containerd clamps it (`restrict_oom_score_adj`), as this machine requires.
pub fn oom_score_adj(qos: QosClass, r: &ContainerResources, memory_capacity: i64) -> i64 {
    match qos {
        QosClass::Guaranteed => -997,
        QosClass::BestEffort => 1000,
        QosClass::Burstable => {
            let request = r.memory_request_bytes.unwrap_or(0);
            let adj = if memory_capacity > 0 {
                1000 - (1000 * request) / memory_capacity
            } else {
                999
            };
            adj.clamp(2, 999)
        }
    }
}

/// MemTotal in bytes, the "capacity" kubelet uses for Burstable scores.
pub fn memory_capacity() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(resources: &[&str]) -> Pod {
        let containers: String = resources
            .iter()
            .enumerate()
            .map(|(i, r)| format!("  - name: c{i}\n    resources: {r}\n"))
            .collect();
        Pod::parse(
            &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  containers:\n{containers}"),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_cpu_millis("200m"), Ok(200));
        assert_eq!(parse_cpu_millis("1"), Ok(1000));
        assert_eq!(parse_cpu_millis("0.5"), Ok(500));
        assert!(parse_cpu_millis("1Gi").is_err());
        assert_eq!(parse_memory_bytes("64Mi"), Ok(64 << 20));
        assert_eq!(parse_memory_bytes("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory_bytes("128M"), Ok(128_000_000));
        assert_eq!(parse_memory_bytes("1000"), Ok(1000));
        assert!(parse_memory_bytes("64MB").is_err());
    }

    #[test]
    fn classes_and_parents() {
        let g = pod(&["{limits: {cpu: 500m, memory: 64Mi}}"]);
        assert_eq!(qos_class(&g), Ok(QosClass::Guaranteed));
        let b = pod(&["{requests: {cpu: 100m}}"]);
        assert_eq!(qos_class(&b), Ok(QosClass::Burstable));
        let mixed = pod(&["{limits: {cpu: 1, memory: 1Gi}}", "{}"]);
        assert_eq!(qos_class(&mixed), Ok(QosClass::Burstable));
        let be = pod(&["{}", "{}"]);
        assert_eq!(qos_class(&be), Ok(QosClass::BestEffort));
        assert_eq!(cgroup_parent(QosClass::Guaranteed, "u1"), "/kubepods/podu1");
        assert_eq!(
            cgroup_parent(QosClass::Burstable, "u1"),
            "/kubepods/burstable/podu1"
        );
        assert_eq!(
            cgroup_parent(QosClass::BestEffort, "u1"),
            "/kubepods/besteffort/podu1"
        );
    }

    #[test]
    fn container_resources_like_kubelet() {
        let p = pod(&["{requests: {cpu: 200m, memory: 32Mi}, limits: {cpu: 1500m, memory: 64Mi}}"]);
        let r = ContainerResources::of(&p.spec.containers[0]).unwrap();
        assert_eq!(r.cpu_shares(), 204);
        assert_eq!(r.cpu_quota(), 150_000);
        assert_eq!(r.memory_limit(), 64 << 20);
        let none = ContainerResources::default();
        assert_eq!(none.cpu_shares(), 2);
        assert_eq!(none.cpu_quota(), 0);
        // A limit alone is also the request.
        let p = pod(&["{limits: {cpu: 1m}}"]);
        let r = ContainerResources::of(&p.spec.containers[0]).unwrap();
        assert_eq!(r.cpu_shares(), 2);
        assert_eq!(r.cpu_quota(), 1000);
        assert_eq!(oom_score_adj(QosClass::Burstable, &r, 1 << 30), 999);
        let half = ContainerResources {
            memory_request_bytes: Some(1 << 29),
            ..Default::default()
        };
        assert_eq!(oom_score_adj(QosClass::Burstable, &half, 1 << 30), 500);
    }
}
