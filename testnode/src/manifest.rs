//! The Pod manifest subset the test node runs, parsed strictly: a field it
//! does not support is an error that names the field, never silently ignored
//! (a test that sets `ports:` and sees nothing happen would mislead).

use std::{collections::BTreeMap, fmt, path::Path};

use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: {message} (the test node supports only the Pod subset listed in testnode/README.md)"
    )]
    Unsupported { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: PodSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Whether kubelet restarts a container that exited with `exit_code`.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub containers: Vec<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_process_namespace: Option<bool>,
    /// The node's network namespace (containerd's: `podscope-node`) instead
    /// of the pod's own: no pod IP, traffic from the node's addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_network: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceList>,
}

/// `cpu` and `memory` only: kubelet turns nothing else into cgroup settings
/// that this node could honour.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceList {
    #[serde(
        default,
        deserialize_with = "quantity",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu: Option<String>,
    #[serde(
        default,
        deserialize_with = "quantity",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory: Option<String>,
}

/// Quantities come as strings ("200m", "64Mi") or bare YAML numbers (`cpu: 1`).
fn quantity<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Q {
        S(String),
        I(i64),
        F(f64),
    }
    Ok(Some(match Q::deserialize(d)? {
        Q::S(s) => s,
        Q::I(i) => i.to_string(),
        Q::F(f) => f.to_string(),
    }))
}

impl Pod {
    /// Reads and validates a manifest file.
    pub fn from_file(path: &Path) -> Result<Pod, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Pod::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a manifest; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Pod, ManifestError> {
        let pod: Pod = serde_yaml::from_str(text).map_err(|e| ManifestError::Unsupported {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        pod.validate().map_err(|message| ManifestError::Invalid {
            path: origin.to_string(),
            message,
        })?;
        Ok(pod)
    }

    fn validate(&self) -> Result<(), String> {
        if self.api_version != "v1" {
            return Err(format!(
                "apiVersion must be `v1`, not `{}`",
                self.api_version
            ));
        }
        if self.kind != "Pod" {
            return Err(format!(
                "kind must be `Pod`, not `{}` (the test node runs pods only)",
                self.kind
            ));
        }
        dns_label(&self.metadata.name, "metadata.name")?;
        dns_label(self.namespace(), "metadata.namespace")?;
        if let Some(uid) = &self.metadata.uid
            && (uid.is_empty() || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(format!(
                "metadata.uid `{uid}` must be letters, digits and dashes (a UUID)"
            ));
        }
        if self.spec.containers.is_empty() {
            return Err("spec.containers must list at least one container".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, c) in self.spec.containers.iter().enumerate() {
            dns_label(&c.name, &format!("spec.containers[{i}].name"))?;
            if !names.insert(c.name.as_str()) {
                return Err(format!(
                    "spec.containers[{i}].name `{}` is used twice",
                    c.name
                ));
            }
            crate::qos::ContainerResources::of(c)
                .map_err(|e| format!("spec.containers[{i}].resources: {e}"))?;
        }
        if let Some(g) = self.spec.termination_grace_period_seconds
            && g < 0
        {
            return Err("spec.terminationGracePeriodSeconds must not be negative".into());
        }
        Ok(())
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
    pub fn restart_policy(&self) -> RestartPolicy {
        self.spec.restart_policy.unwrap_or_default()
    }
    /// Kubernetes' default is 30 s.
    pub fn grace_period_seconds(&self) -> i64 {
        self.spec.termination_grace_period_seconds.unwrap_or(30)
    }
    pub fn share_process_namespace(&self) -> bool {
        self.spec.share_process_namespace.unwrap_or(false)
    }
    pub fn host_network(&self) -> bool {
        self.spec.host_network.unwrap_or(false)
    }
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }
}

impl Container {
    pub fn image(&self) -> &str {
        self.image.as_deref().unwrap_or(crate::paths::IMAGE)
    }
}

/// Kubernetes names here are DNS labels; that also keeps `_` free as the
/// separator in `<namespace>_<name>` file names.
pub(crate) fn dns_label(s: &str, field: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} `{s}` must be a DNS label: 1 to 63 lowercase letters, digits or `-`, starting and ending with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  restartPolicy: OnFailure
  terminationGracePeriodSeconds: 3
  shareProcessNamespace: true
  containers:
  - name: main
    command: ["sh", "-c"]
    args: ["sleep 10"]
    env: [{name: A, value: "1"}]
    resources:
      requests: {cpu: 100m, memory: 32Mi}
      limits: {cpu: 1, memory: 64Mi}
"#;

    #[test]
    fn parses_the_supported_subset() {
        let pod = Pod::parse(GOOD, "good.yaml").unwrap();
        assert_eq!(pod.namespace(), "shop");
        assert_eq!(pod.restart_policy(), RestartPolicy::OnFailure);
        assert_eq!(pod.grace_period_seconds(), 3);
        assert!(pod.share_process_namespace());
        let c = &pod.spec.containers[0];
        assert_eq!(c.image(), crate::paths::IMAGE);
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits.cpu.as_deref(), Some("1"));
    }

    #[test]
    fn an_unknown_field_is_named() {
        let text = GOOD.replace("    env:", "    ports: [{containerPort: 80}]\n    env:");
        let err = Pod::parse(&text, "p.yaml").unwrap_err().to_string();
        assert!(err.contains("unknown field `ports`"), "{err}");
        assert!(err.contains("spec.containers[0]"), "{err}");
    }

    #[test]
    fn an_unknown_resource_is_named() {
        let text = GOOD.replace("cpu: 1,", "ephemeral-storage: 1Gi, cpu: 1,");
        let err = Pod::parse(&text, "p.yaml").unwrap_err().to_string();
        assert!(err.contains("ephemeral-storage"), "{err}");
    }

    #[test]
    fn wrong_kind_and_names_are_refused() {
        let err = Pod::parse(&GOOD.replace("kind: Pod", "kind: Deployment"), "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kind must be `Pod`"), "{err}");
        let err = Pod::parse(&GOOD.replace("name: web", "name: Web_1"), "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("metadata.name"), "{err}");
        let err = Pod::parse(&GOOD.replace("cpu: 1,", "cpu: lots,"), "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("resources"), "{err}");
    }

    #[test]
    fn restart_policies() {
        assert!(RestartPolicy::Always.restarts(0));
        assert!(RestartPolicy::OnFailure.restarts(3));
        assert!(!RestartPolicy::OnFailure.restarts(0));
        assert!(!RestartPolicy::Never.restarts(137));
    }
}
