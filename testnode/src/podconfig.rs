//! What kubelet sends over CRI for a pod: the sandbox config (metadata,
//! labels, cgroup parent, namespaces) and each container's config (labels,
//! annotations, resources). Labels and annotations are kubelet's exact keys,
//! because podscope reads them on real nodes.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::{
    cri::api,
    manifest::{Container, Pod},
    paths,
    qos::{self, ContainerResources, QosClass},
};

pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
pub const ANNOTATION_CONTAINER_HASH: &str = "io.kubernetes.container.hash";
pub const ANNOTATION_RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
pub const ANNOTATION_PRE_STOP: &str = "io.kubernetes.container.preStopHandler";
pub const ANNOTATION_PORTS: &str = "io.kubernetes.container.ports";
pub const ANNOTATION_GRACE: &str = "io.kubernetes.pod.terminationGracePeriod";
pub const ANNOTATION_TERMINATION_MESSAGE_PATH: &str =
    "io.kubernetes.container.terminationMessagePath";
pub const ANNOTATION_TERMINATION_MESSAGE_POLICY: &str =
    "io.kubernetes.container.terminationMessagePolicy";
/// `init`, `container` or `ephemeral` (kubelet's `containerTypeLabel`).
pub const ANNOTATION_CONTAINER_TYPE: &str = "io.kubernetes.container.type";

/// Which list of the pod's spec a container comes from, as kubelet
/// annotates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerType {
    Init,
    Container,
}

impl ContainerType {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerType::Init => "init",
            ContainerType::Container => "container",
        }
    }
}

/// Everything about a pod that does not change between its containers' attempts.
#[derive(Debug, Clone)]
pub struct PodPlan {
    pub pod: Pod,
    pub uid: String,
    pub qos: QosClass,
    pub cgroup_parent: String,
    memory_capacity: i64,
}

impl PodPlan {
    /// `uid` is the pod's metadata.uid (apply fills it in when absent).
    pub fn new(pod: Pod, uid: String) -> Result<PodPlan, qos::QuantityError> {
        let qos = qos::qos_class(&pod)?;
        Ok(PodPlan {
            cgroup_parent: qos::cgroup_parent(qos, &uid),
            pod,
            uid,
            qos,
            memory_capacity: qos::memory_capacity(),
        })
    }

    fn pod_labels(&self) -> HashMap<String, String> {
        [
            (LABEL_POD_NAME, self.pod.name()),
            (LABEL_POD_NAMESPACE, self.pod.namespace()),
            (LABEL_POD_UID, self.uid.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn pid_mode(&self) -> i32 {
        if self.pod.share_process_namespace() {
            api::NamespaceMode::Pod as i32
        } else {
            api::NamespaceMode::Container as i32
        }
    }

    fn namespaces(&self) -> api::NamespaceOption {
        api::NamespaceOption {
            network: if self.pod.host_network() {
                // containerd's own namespace, which is the node's.
                api::NamespaceMode::Node as i32
            } else {
                api::NamespaceMode::Pod as i32
            },
            pid: self.pid_mode(),
            ipc: api::NamespaceMode::Pod as i32,
            ..Default::default()
        }
    }

    /// kubelet's log directory layout: `<ns>_<name>_<uid>`.
    pub fn log_directory(&self) -> String {
        paths::logs_dir()
            .join(format!(
                "{}_{}_{}",
                self.pod.namespace(),
                self.pod.name(),
                self.uid
            ))
            .display()
            .to_string()
    }

    pub fn sandbox_config(&self) -> api::PodSandboxConfig {
        let mut labels = self.pod_labels();
        for (k, v) in &self.pod.metadata.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut annotations: HashMap<String, String> = self
            .pod
            .metadata
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // What kubelet adds to a static pod (one read from a manifest file).
        annotations.insert("kubernetes.io/config.source".into(), "file".into());
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: self.pod.name().into(),
                uid: self.uid.clone(),
                namespace: self.pod.namespace().into(),
                attempt: 0,
            }),
            // A hostNetwork pod keeps the node's UTS namespace and name
            // (runc refuses a hostname without a private UTS namespace).
            hostname: if self.pod.host_network() {
                String::new()
            } else {
                self.pod.name().into()
            },
            log_directory: self.log_directory(),
            labels,
            annotations,
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(self.namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The config for attempt `attempt` of container `c` (`restart_count`
    /// restarts so far, which kubelet records in an annotation).
    pub fn container_config(
        &self,
        c: &Container,
        kind: ContainerType,
        attempt: u32,
        restart_count: u32,
    ) -> Result<api::ContainerConfig, qos::QuantityError> {
        let r = ContainerResources::of(c)?;
        let mut labels = self.pod_labels();
        labels.insert(LABEL_CONTAINER_NAME.into(), c.name.clone());
        let annotations: HashMap<String, String> = [
            (ANNOTATION_CONTAINER_HASH, container_hash(c)),
            (ANNOTATION_RESTART_COUNT, restart_count.to_string()),
            (
                ANNOTATION_GRACE,
                self.pod.grace_period_seconds().to_string(),
            ),
            // kubelet's defaults (the manifest has no field for them here).
            (
                ANNOTATION_TERMINATION_MESSAGE_PATH,
                "/dev/termination-log".to_string(),
            ),
            (ANNOTATION_TERMINATION_MESSAGE_POLICY, "File".to_string()),
            (ANNOTATION_CONTAINER_TYPE, kind.as_str().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(kubelet_json_annotations(c))
        .collect();
        Ok(api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: c.name.clone(),
                attempt,
            }),
            image: Some(api::ImageSpec {
                image: c.runtime_image().into(),
                ..Default::default()
            }),
            command: c.command.clone(),
            args: c.args.clone(),
            envs: c
                .env
                .iter()
                .map(|e| api::KeyValue {
                    key: e.name.clone(),
                    value: e.value.clone(),
                })
                .collect(),
            labels,
            annotations,
            log_path: format!("{}/{attempt}.log", c.name),
            linux: Some(api::LinuxContainerConfig {
                resources: Some(api::LinuxContainerResources {
                    cpu_period: qos::CPU_PERIOD_US,
                    cpu_quota: r.cpu_quota(),
                    cpu_shares: r.cpu_shares(),
                    memory_limit_in_bytes: r.memory_limit(),
                    oom_score_adj: qos::oom_score_adj(self.qos, &r, self.memory_capacity),
                    ..Default::default()
                }),
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(self.namespaces()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        })
    }
}

/// kubelet's JSON annotations (pkg/kubelet/kuberuntime/labels.go): the
/// preStop handler and the ports, which a node agent can read from CRI.
fn kubelet_json_annotations(c: &Container) -> Vec<(String, String)> {
    let mut out = vec![];
    if let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref())
        && let Ok(json) = serde_json::to_string(h)
    {
        out.push((ANNOTATION_PRE_STOP.to_string(), json));
    }
    if !c.ports.is_empty()
        && let Ok(json) = serde_json::to_string(&c.ports)
    {
        out.push((ANNOTATION_PORTS.to_string(), json));
    }
    out
}

/// A stable hash of the container's spec (kubelet hashes the spec too; the
/// exact function does not matter, only that a changed spec changes it).
pub fn container_hash(c: &Container) -> String {
    let json = serde_json::to_vec(c).unwrap_or_default();
    let d = Sha256::digest(&json);
    d.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(extra: &str) -> PodPlan {
        let pod = Pod::parse(
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, labels: {{app: web}}}}\nspec:\n{extra}  containers:\n  - name: main\n    resources: {{requests: {{cpu: 250m, memory: 32Mi}}, limits: {{cpu: 500m, memory: 64Mi}}}}\n"
            ),
            "t",
        )
        .unwrap();
        PodPlan::new(pod, "0000-1111".into()).unwrap()
    }

    #[test]
    fn sandbox_like_kubelet() {
        let p = plan("  shareProcessNamespace: true\n");
        let s = p.sandbox_config();
        let m = s.metadata.as_ref().unwrap();
        assert_eq!(
            (m.name.as_str(), m.namespace.as_str(), m.uid.as_str()),
            ("web", "shop", "0000-1111")
        );
        assert_eq!(s.labels[LABEL_POD_UID], "0000-1111");
        assert_eq!(s.labels["app"], "web");
        let linux = s.linux.as_ref().unwrap();
        assert_eq!(linux.cgroup_parent, "/kubepods/burstable/pod0000-1111");
        let ns = linux
            .security_context
            .as_ref()
            .unwrap()
            .namespace_options
            .as_ref()
            .unwrap();
        assert_eq!(ns.pid, api::NamespaceMode::Pod as i32);
        assert_eq!(
            plan("")
                .sandbox_config()
                .linux
                .unwrap()
                .security_context
                .unwrap()
                .namespace_options
                .unwrap()
                .pid,
            api::NamespaceMode::Container as i32
        );
    }

    #[test]
    fn container_like_kubelet() {
        let p = plan("  terminationGracePeriodSeconds: 7\n");
        let c = p
            .container_config(&p.pod.spec.containers[0], ContainerType::Container, 2, 2)
            .unwrap();
        assert_eq!(c.metadata.as_ref().unwrap().attempt, 2);
        assert_eq!(c.labels[LABEL_CONTAINER_NAME], "main");
        assert_eq!(c.labels[LABEL_POD_NAMESPACE], "shop");
        assert_eq!(c.annotations[ANNOTATION_RESTART_COUNT], "2");
        assert_eq!(c.annotations[ANNOTATION_GRACE], "7");
        assert_eq!(c.annotations[ANNOTATION_CONTAINER_HASH].len(), 8);
        assert_eq!(c.annotations[ANNOTATION_CONTAINER_TYPE], "container");
        let init = p
            .container_config(&p.pod.spec.containers[0], ContainerType::Init, 0, 0)
            .unwrap();
        assert_eq!(init.annotations[ANNOTATION_CONTAINER_TYPE], "init");
        let r = c.linux.unwrap().resources.unwrap();
        assert_eq!(r.cpu_period, 100_000);
        assert_eq!(r.cpu_quota, 50_000);
        assert_eq!(r.cpu_shares, 256);
        assert_eq!(r.memory_limit_in_bytes, 64 << 20);
        assert_eq!(c.log_path, "main/2.log");
    }
}
