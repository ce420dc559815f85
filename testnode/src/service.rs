//! The Service manifest subset the test node serves (ClusterIP Services with
//! a selector), parsed as strictly as Pods: an unsupported field is an error
//! that names it. `apply -f` stores them under `services/`; [`crate::kubeproxy`]
//! turns them into kube-proxy's iptables rules.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    error::{Error, IoContext, Result},
    manifest::{ManifestError, Metadata, dns_label},
    paths,
};

/// Service addresses come from here (a benchmarking range, never RFC 1918).
pub const SERVICE_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 0, 0), 16);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Honoured when given; allocated from [`SERVICE_SUBNET`] otherwise.
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<Ipv4Addr>,
    /// No selector or one that matches no ready pod: the Service has no endpoints.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    pub port: u16,
    /// A number only: the test node's pods declare no named container ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// `type: NodePort` only: honoured when given, allocated in
    /// [`NODE_PORTS`] otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

/// kube-apiserver's default `--service-node-port-range`.
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

impl ServicePort {
    /// `TCP`, `UDP` or `SCTP` (Kubernetes' default is TCP).
    pub fn protocol(&self) -> &str {
        self.protocol.as_deref().unwrap_or("TCP")
    }
    pub fn target_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// Only the fields that say what a document is, to route `apply -f`.
#[derive(Deserialize)]
struct TypeMeta {
    kind: Option<String>,
}

/// The `kind` of a manifest text, when it has one.
pub fn kind_of(text: &str) -> Option<String> {
    serde_yaml::from_str::<TypeMeta>(text).ok()?.kind
}

impl Service {
    pub fn parse(text: &str, origin: &str) -> Result<Service, ManifestError> {
        let svc: Service = serde_yaml::from_str(text).map_err(|e| ManifestError::Unsupported {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        svc.validate().map_err(|message| ManifestError::Invalid {
            path: origin.to_string(),
            message,
        })?;
        Ok(svc)
    }

    fn validate(&self) -> Result<(), String> {
        if self.api_version != "v1" {
            return Err(format!(
                "apiVersion must be `v1`, not `{}`",
                self.api_version
            ));
        }
        if self.kind != "Service" {
            return Err(format!("kind must be `Service`, not `{}`", self.kind));
        }
        dns_label(&self.metadata.name, "metadata.name")?;
        dns_label(self.namespace(), "metadata.namespace")?;
        if let Some(t) = &self.spec.type_
            && t != "ClusterIP"
            && t != "NodePort"
        {
            return Err(format!(
                "spec.type `{t}` is not supported: the test node serves ClusterIP and NodePort Services only"
            ));
        }
        for (i, p) in self.spec.ports.iter().enumerate() {
            match p.node_port {
                Some(_) if !self.is_node_port() => {
                    return Err(format!("spec.ports[{i}].nodePort needs spec.type NodePort"));
                }
                Some(n) if !NODE_PORTS.contains(&n) => {
                    return Err(format!(
                        "spec.ports[{i}].nodePort {n} is outside the node port range 30000-32767"
                    ));
                }
                _ => {}
            }
        }
        if let Some(ip) = self.spec.cluster_ip
            && !in_service_subnet(ip)
        {
            return Err(format!(
                "spec.clusterIP {ip} is outside the test node's Service range 198.19.0.0/16"
            ));
        }
        if self.spec.ports.is_empty() {
            return Err("spec.ports must list at least one port".into());
        }
        let named = self.spec.ports.len() > 1;
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.spec.ports.iter().enumerate() {
            if !matches!(p.protocol(), "TCP" | "UDP" | "SCTP") {
                return Err(format!(
                    "spec.ports[{i}].protocol must be TCP, UDP or SCTP, not `{}`",
                    p.protocol()
                ));
            }
            if p.port == 0 || p.target_port() == 0 {
                return Err(format!("spec.ports[{i}]: ports must be 1 to 65535"));
            }
            match &p.name {
                Some(n) => dns_label(n, &format!("spec.ports[{i}].name"))?,
                None if named => {
                    return Err(format!(
                        "spec.ports[{i}].name is required when a Service has several ports"
                    ));
                }
                None => {}
            }
            if !seen.insert((p.port, p.protocol().to_string())) {
                return Err(format!("spec.ports[{i}]: port {} is used twice", p.port));
            }
        }
        Ok(())
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
    pub fn is_node_port(&self) -> bool {
        self.spec.type_.as_deref() == Some("NodePort")
    }
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }
}

fn in_service_subnet(ip: Ipv4Addr) -> bool {
    let (net, len) = SERVICE_SUBNET;
    u32::from(ip) >> (32 - len) == u32::from(net) >> (32 - len)
}

pub fn services_dir() -> PathBuf {
    paths::services_dir()
}

pub fn service_file(namespace: &str, name: &str) -> PathBuf {
    services_dir().join(format!("{}.yaml", paths::pod_key(namespace, name)))
}

/// Every stored Service, sorted by file name; unreadable files are skipped
/// (apply validated them when they were written).
pub fn list() -> Vec<Service> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(services_dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).ok()?;
            Service::parse(&text, &f.display().to_string()).ok()
        })
        .collect()
}

/// Stores a Service, allocating its cluster IP when the manifest has none:
/// "created", "unchanged" or an error when one of that name exists with
/// another spec or the address is taken.
pub fn store(mut svc: Service) -> Result<(&'static str, Service)> {
    let dir = services_dir();
    std::fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
    let target = service_file(svc.namespace(), svc.name());
    let others: Vec<Service> = list()
        .into_iter()
        .filter(|s| (s.namespace(), s.name()) != (svc.namespace(), svc.name()))
        .collect();
    if let Ok(text) = std::fs::read_to_string(&target) {
        let old = Service::parse(&text, &target.display().to_string())?;
        let mut cmp = svc.clone();
        if cmp.spec.cluster_ip.is_none() {
            cmp.spec.cluster_ip = old.spec.cluster_ip;
        }
        for (p, o) in cmp.spec.ports.iter_mut().zip(&old.spec.ports) {
            if p.node_port.is_none() {
                p.node_port = o.node_port;
            }
        }
        if cmp != old {
            return Err(Error::Msg(format!(
                "service {}/{} exists with a different spec; delete it first (`podscope-testnode delete service/{}/{}`)",
                svc.namespace(),
                svc.name(),
                svc.namespace(),
                svc.name()
            )));
        }
        return Ok(("unchanged", old));
    }
    let taken: Vec<Ipv4Addr> = others.iter().filter_map(|s| s.spec.cluster_ip).collect();
    match svc.spec.cluster_ip {
        Some(ip) if taken.contains(&ip) => {
            return Err(Error::Msg(format!(
                "spec.clusterIP {ip} is already allocated to another Service"
            )));
        }
        Some(_) => {}
        None => svc.spec.cluster_ip = Some(allocate(svc.namespace(), svc.name(), &taken)?),
    }
    if svc.is_node_port() {
        allocate_node_ports(&mut svc, &others)?;
    }
    let tmp = target.with_extension("yaml.tmp");
    let text = svc
        .to_yaml()
        .map_err(|e| Error::Msg(format!("cannot encode the Service: {e}")))?;
    std::fs::write(&tmp, text).ctx(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &target).ctx(|| format!("cannot write {}", target.display()))?;
    Ok(("created", svc))
}

/// Removes a stored Service; false when there was none.
pub fn remove(namespace: &str, name: &str) -> Result<bool> {
    let f = service_file(namespace, name);
    match std::fs::remove_file(&f) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).ctx(|| format!("cannot remove {}", f.display())),
    }
}

/// Gives every port of a NodePort Service its node port: the manifest's
/// when it names one (refused when another Service has it), else a stable
/// one from [`NODE_PORTS`] (the same name and port get the same again).
fn allocate_node_ports(svc: &mut Service, others: &[Service]) -> Result<()> {
    let mut taken: Vec<(u16, String)> = others
        .iter()
        .flat_map(|s| &s.spec.ports)
        .filter_map(|p| Some((p.node_port?, p.protocol().to_string())))
        .collect();
    for p in svc.spec.ports.iter().filter(|p| p.node_port.is_some()) {
        let key = (p.node_port.unwrap_or_default(), p.protocol().to_string());
        if taken.contains(&key) {
            return Err(Error::Msg(format!(
                "nodePort {}/{} is already allocated to another Service",
                key.0, key.1
            )));
        }
        taken.push(key);
    }
    let (ns, name) = (svc.namespace().to_string(), svc.name().to_string());
    let size = u32::from(NODE_PORTS.end() - NODE_PORTS.start()) + 1;
    for p in svc.spec.ports.iter_mut().filter(|p| p.node_port.is_none()) {
        let digest = Sha256::digest(format!("{ns}/{name}:{}", p.port).as_bytes());
        let start = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % size;
        let proto = p.protocol().to_string();
        let free = (0..size)
            .map(|i| NODE_PORTS.start() + ((start + i) % size) as u16)
            .find(|n| !taken.contains(&(*n, proto.clone())))
            .ok_or_else(|| Error::Msg("the node port range 30000-32767 is full".into()))?;
        taken.push((free, proto));
        p.node_port = Some(free);
    }
    Ok(())
}

/// A stable address for a Service (the same name gets the same address
/// again), stepping past the taken ones; .0.0, .0.1 and the broadcast are skipped.
fn allocate(namespace: &str, name: &str, taken: &[Ipv4Addr]) -> Result<Ipv4Addr> {
    let (net, len) = SERVICE_SUBNET;
    let size = 1u32 << (32 - len);
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let start = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % size;
    for i in 0..size {
        let host = (start + i) % size;
        if host < 2 || host == size - 1 {
            continue;
        }
        let ip = Ipv4Addr::from(u32::from(net) + host);
        if !taken.contains(&ip) {
            return Ok(ip);
        }
    }
    Err(Error::Msg("the Service range 198.19.0.0/16 is full".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
"#;

    #[test]
    fn parses_a_cluster_ip_service() {
        let s = Service::parse(SVC, "s.yaml").unwrap();
        assert_eq!(s.spec.cluster_ip, Some(Ipv4Addr::new(198, 19, 0, 10)));
        assert_eq!(s.spec.ports[0].target_port(), 8080);
        assert_eq!(s.spec.ports[0].protocol(), "TCP");
        assert_eq!(kind_of(SVC).as_deref(), Some("Service"));
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        let err = Service::parse(&SVC.replace("198.19.0.10", "203.0.113.10"), "s")
            .unwrap_err()
            .to_string();
        assert!(err.contains("198.19.0.0/16"), "{err}");
        let err = Service::parse(
            &SVC.replace("  selector", "  type: LoadBalancer\n  selector"),
            "s",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("LoadBalancer"), "{err}");
        let err = Service::parse(
            &SVC.replace("targetPort: 8080", "targetPort: 8080, nodePort: 30080"),
            "s",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("needs spec.type NodePort"), "{err}");
        let np = SVC.replace("  selector", "  type: NodePort\n  selector");
        let err = Service::parse(
            &np.replace("targetPort: 8080", "targetPort: 8080, nodePort: 80"),
            "s",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("30000-32767"), "{err}");
        let err = Service::parse(
            &SVC.replace("  selector", "  sessionAffinity: None\n  selector"),
            "s",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sessionAffinity"), "{err}");
    }

    #[test]
    fn node_ports_are_honoured_or_allocated_in_the_range() {
        let np = SVC.replace("  selector", "  type: NodePort\n  selector");
        let mut a = Service::parse(&np, "s").unwrap();
        allocate_node_ports(&mut a, &[]).unwrap();
        let given = a.spec.ports[0].node_port.unwrap();
        assert!(NODE_PORTS.contains(&given));
        let mut again = Service::parse(&np, "s").unwrap();
        allocate_node_ports(&mut again, &[]).unwrap();
        assert_eq!(again.spec.ports[0].node_port, Some(given), "stable");
        let mut other = Service::parse(&np.replace("name: web", "name: web2"), "s").unwrap();
        other.spec.ports[0].node_port = Some(given);
        let err = allocate_node_ports(&mut other, &[a.clone()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("already allocated"), "{err}");
        let mut same = Service::parse(&np, "s").unwrap();
        allocate_node_ports(&mut same, &[a]).unwrap();
        assert_ne!(
            same.spec.ports[0].node_port,
            Some(given),
            "steps past a taken port"
        );
    }

    #[test]
    fn allocation_is_stable_and_avoids_taken_addresses() {
        let a = allocate("shop", "web", &[]).unwrap();
        assert_eq!(a, allocate("shop", "web", &[]).unwrap());
        assert!(in_service_subnet(a));
        let b = allocate("shop", "web", &[a]).unwrap();
        assert_ne!(a, b);
    }
}
