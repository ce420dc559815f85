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
    /// Run in order, each to completion, before the app containers start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<Container>,
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
    /// Informational, as in Kubernetes (named ports feed probes' `port`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerPort {
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// A port given as a number or as the name of one of the container's `ports`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// One action of a probe or a hook (exactly one of them is set; `sleep` for hooks only).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Handler {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep: Option<SleepAction>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecAction {
    pub command: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpGetAction {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub port: PortRef,
    /// Defaults to the pod's IP, as kubelet does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `HTTP` only: the node has no TLS client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSocketAction {
    pub port: PortRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepAction {
    pub seconds: i64,
}

/// A probe: its action (flattened, as in the Kubernetes API) and its timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<i64>,
    /// Replaces the pod's grace period when this probe's failure kills the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
}

impl Probe {
    /// The action, as a hook's handler (serde cannot flatten with deny_unknown_fields).
    pub fn handler(&self) -> Handler {
        Handler {
            exec: self.exec.clone(),
            http_get: self.http_get.clone(),
            tcp_socket: self.tcp_socket.clone(),
            sleep: None,
        }
    }
    /// Kubernetes' defaults: 0 s delay, every 10 s, 1 s timeout, 3 failures, 1 success.
    pub fn initial_delay(&self) -> i64 {
        self.initial_delay_seconds.unwrap_or(0)
    }
    pub fn period(&self) -> i64 {
        self.period_seconds.unwrap_or(10)
    }
    pub fn timeout(&self) -> i64 {
        self.timeout_seconds.unwrap_or(1)
    }
    pub fn failure_threshold(&self) -> i64 {
        self.failure_threshold.unwrap_or(3)
    }
    pub fn success_threshold(&self) -> i64 {
        self.success_threshold.unwrap_or(1)
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Lifecycle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_start: Option<Handler>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_stop: Option<Handler>,
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
        let all = (self.spec.init_containers.iter().enumerate())
            .map(|(i, c)| (format!("spec.initContainers[{i}]"), c, true))
            .chain(
                (self.spec.containers.iter().enumerate())
                    .map(|(i, c)| (format!("spec.containers[{i}]"), c, false)),
            );
        for (at, c, init) in all {
            dns_label(&c.name, &format!("{at}.name"))?;
            if !names.insert(c.name.as_str()) {
                return Err(format!("{at}.name `{}` is used twice", c.name));
            }
            crate::qos::ContainerResources::of(c).map_err(|e| format!("{at}.resources: {e}"))?;
            c.validate_actions(&at, init)?;
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
    /// The image the manifest asked for (the node's own when absent).
    pub fn image(&self) -> &str {
        self.image.as_deref().unwrap_or(crate::paths::IMAGE)
    }

    /// What actually runs: no registry is reachable here, so every container
    /// runs the node's own image (`apply` says so in a notice).
    pub fn runtime_image(&self) -> &str {
        crate::paths::IMAGE
    }

    /// The notice `apply` prints when the manifest names another image.
    pub fn image_notice(&self) -> Option<String> {
        let asked = self.image.as_deref()?;
        (asked != crate::paths::IMAGE).then(|| {
            format!(
                "notice: container {}: image `{asked}` is not pulled (no registry is reachable); it runs the node's own image {} (busybox and podscope-helper)",
                self.name,
                crate::paths::IMAGE
            )
        })
    }

    /// A probe's or hook's port: a number, or the name of one of `ports`.
    pub fn resolve_port(&self, port: &PortRef) -> Result<u16, String> {
        match port {
            PortRef::Number(n) => Ok(*n),
            PortRef::Name(name) => self
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .ok_or_else(|| format!("no port named `{name}` in the container's ports")),
        }
    }

    fn validate_actions(&self, at: &str, init: bool) -> Result<(), String> {
        let probes = [
            ("livenessProbe", &self.liveness_probe),
            ("readinessProbe", &self.readiness_probe),
            ("startupProbe", &self.startup_probe),
        ];
        if init && (probes.iter().any(|(_, p)| p.is_some()) || self.lifecycle.is_some()) {
            return Err(format!(
                "{at}: an init container may not have probes or lifecycle hooks (as in Kubernetes)"
            ));
        }
        for (field, probe) in probes {
            let Some(p) = probe else { continue };
            let at = format!("{at}.{field}");
            self.validate_handler(&at, &p.handler(), false)?;
            for (name, v, min) in [
                ("initialDelaySeconds", p.initial_delay(), 0),
                ("periodSeconds", p.period(), 1),
                ("timeoutSeconds", p.timeout(), 1),
                ("failureThreshold", p.failure_threshold(), 1),
                ("successThreshold", p.success_threshold(), 1),
            ] {
                if v < min {
                    return Err(format!("{at}.{name} must be at least {min}"));
                }
            }
            if field != "readinessProbe" && p.success_threshold() != 1 {
                return Err(format!("{at}.successThreshold must be 1"));
            }
            if let Some(g) = p.termination_grace_period_seconds {
                if field == "readinessProbe" {
                    return Err(format!(
                        "{at}.terminationGracePeriodSeconds is not allowed on a readiness probe"
                    ));
                }
                if g < 1 {
                    return Err(format!(
                        "{at}.terminationGracePeriodSeconds must be positive"
                    ));
                }
            }
        }
        if let Some(l) = &self.lifecycle {
            for (field, h) in [("postStart", &l.post_start), ("preStop", &l.pre_stop)] {
                if let Some(h) = h {
                    self.validate_handler(&format!("{at}.lifecycle.{field}"), h, true)?;
                }
            }
        }
        Ok(())
    }

    fn validate_handler(&self, at: &str, h: &Handler, hook: bool) -> Result<(), String> {
        let set = [
            h.exec.is_some(),
            h.http_get.is_some(),
            h.tcp_socket.is_some(),
            h.sleep.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            return Err(format!(
                "{at} needs exactly one of {}",
                if hook {
                    "exec, httpGet or sleep"
                } else {
                    "exec, httpGet or tcpSocket"
                }
            ));
        }
        if hook && h.tcp_socket.is_some() {
            return Err(format!(
                "{at}.tcpSocket is not supported as a lifecycle hook (kubelet ignores it; use exec, httpGet or sleep)"
            ));
        }
        if let Some(e) = &h.exec
            && e.command.is_empty()
        {
            return Err(format!("{at}.exec.command must not be empty"));
        }
        if let Some(g) = &h.http_get {
            if g.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                return Err(format!(
                    "{at}.httpGet.scheme: only HTTP is supported on the test node"
                ));
            }
            self.resolve_port(&g.port)
                .map_err(|e| format!("{at}.httpGet.port: {e}"))?;
        }
        if let Some(t) = &h.tcp_socket {
            self.resolve_port(&t.port)
                .map_err(|e| format!("{at}.tcpSocket.port: {e}"))?;
        }
        if let Some(s) = &h.sleep
            && s.seconds < 0
        {
            return Err(format!("{at}.sleep.seconds must not be negative"));
        }
        Ok(())
    }
}

/// One document of a manifest file, by kind, as YAML text.
#[derive(Debug, Clone)]
pub struct Document {
    pub kind: String,
    pub text: String,
    /// `file`, `file#2` (second document), `file#2.items[0]`: for errors.
    pub origin: String,
}

/// Splits a file into its documents (`---`), expanding `kind: List` items.
/// Empty documents are skipped; a kind the node cannot run is an error
/// saying what it runs instead.
pub fn documents(text: &str, origin: &str) -> Result<Vec<Document>, ManifestError> {
    let mut out = vec![];
    for (n, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = if n == 0 {
            origin.to_string()
        } else {
            format!("{origin}#{}", n + 1)
        };
        let value = serde_yaml::Value::deserialize(de).map_err(|e| ManifestError::Invalid {
            path: at.clone(),
            message: format!("not YAML: {e}"),
        })?;
        if value.is_null() {
            continue;
        }
        push_document(value, at, &mut out)?;
    }
    if out.is_empty() {
        return Err(ManifestError::Invalid {
            path: origin.to_string(),
            message: "no document in the file".into(),
        });
    }
    Ok(out)
}

fn push_document(
    value: serde_yaml::Value,
    at: String,
    out: &mut Vec<Document>,
) -> Result<(), ManifestError> {
    let invalid = |message: String| ManifestError::Invalid {
        path: at.clone(),
        message,
    };
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or_else(|| invalid("no `kind`".into()))?
        .to_string();
    match kind.as_str() {
        "List" => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .ok_or_else(|| invalid("a `kind: List` needs `items`".into()))?;
            for (i, item) in items.iter().enumerate() {
                push_document(item.clone(), format!("{at}.items[{i}]"), out)?;
            }
            Ok(())
        }
        "Pod" | "Service" => {
            let text = serde_yaml::to_string(&value).map_err(|e| invalid(e.to_string()))?;
            out.push(Document {
                kind,
                text,
                origin: at,
            });
            Ok(())
        }
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job" | "CronJob" => {
            Err(invalid(format!(
                "kind `{kind}` needs a controller and an API server, which the test node does not have: write its pod template as a `kind: Pod`"
            )))
        }
        other => Err(invalid(format!(
            "kind `{other}` is not supported: the test node runs `Pod` and `Service` (also inside `kind: List` or `---` documents)"
        ))),
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
        let text = GOOD.replace("    env:", "    volumeMounts: [{name: x}]\n    env:");
        let err = Pod::parse(&text, "p.yaml").unwrap_err().to_string();
        assert!(err.contains("unknown field `volumeMounts`"), "{err}");
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

    const PROBED: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  initContainers:
  - name: setup
    command: ["true"]
  containers:
  - name: main
    image: busybox:1.36
    ports: [{containerPort: 8080, name: http}]
    livenessProbe:
      httpGet: {path: /healthz, port: http}
      periodSeconds: 1
      failureThreshold: 2
      terminationGracePeriodSeconds: 4
    readinessProbe:
      tcpSocket: {port: 8080}
      successThreshold: 2
    startupProbe:
      exec: {command: [cat, /tmp/started]}
    lifecycle:
      postStart: {exec: {command: [touch, /tmp/up]}}
      preStop: {sleep: {seconds: 3}}
"#;

    #[test]
    fn probes_hooks_ports_and_init_containers_parse() {
        let pod = Pod::parse(PROBED, "p").unwrap();
        let c = &pod.spec.containers[0];
        assert_eq!(pod.spec.init_containers[0].name, "setup");
        let l = c.liveness_probe.as_ref().unwrap();
        assert_eq!((l.period(), l.failure_threshold(), l.timeout()), (1, 2, 1));
        let port = &l.http_get.as_ref().unwrap().port;
        assert_eq!(c.resolve_port(port), Ok(8080));
        let r = c.readiness_probe.as_ref().unwrap();
        assert_eq!((r.period(), r.success_threshold()), (10, 2));
        assert_eq!(
            c.lifecycle
                .as_ref()
                .unwrap()
                .pre_stop
                .as_ref()
                .unwrap()
                .sleep,
            Some(SleepAction { seconds: 3 })
        );
        // Another image runs the node's own, with a notice.
        assert_eq!(c.runtime_image(), crate::paths::IMAGE);
        assert!(c.image_notice().unwrap().contains("busybox:1.36"));
        assert_eq!(pod.spec.init_containers[0].image_notice(), None);
    }

    #[test]
    fn bad_probes_and_hooks_are_named() {
        for (from, to, want) in [
            ("port: http}", "port: web}", "no port named `web`"),
            (
                "failureThreshold: 2",
                "failureThreshold: 0",
                "failureThreshold must be at least 1",
            ),
            (
                "preStop: {sleep: {seconds: 3}}",
                "preStop: {tcpSocket: {port: 1}}",
                "not supported as a lifecycle hook",
            ),
            (
                "successThreshold: 2",
                "successThreshold: 2\n      terminationGracePeriodSeconds: 1",
                "not allowed on a readiness probe",
            ),
            (
                "    command: [\"true\"]",
                "    command: [\"true\"]\n    livenessProbe: {exec: {command: [x]}}",
                "init container may not have probes",
            ),
            (
                "exec: {command: [cat, /tmp/started]}",
                "exec: {command: []}",
                "must not be empty",
            ),
        ] {
            assert!(PROBED.contains(from), "{from}");
            let err = Pod::parse(&PROBED.replace(from, to), "p")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        let both = PROBED.replace(
            "tcpSocket: {port: 8080}",
            "tcpSocket: {port: 8080}\n      exec: {command: [x]}",
        );
        let err = Pod::parse(&both, "p").unwrap_err().to_string();
        assert!(err.contains("exactly one of"), "{err}");
    }

    #[test]
    fn documents_lists_and_refused_kinds() {
        let svc =
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n";
        let text = format!("---\n{svc}---\n{GOOD}\n---\n");
        let docs = documents(&text, "f").unwrap();
        let kinds: Vec<&str> = docs.iter().map(|d| d.kind.as_str()).collect();
        assert_eq!(kinds, ["Service", "Pod"]);
        assert_eq!(
            Pod::parse(&docs[1].text, &docs[1].origin).unwrap().name(),
            "web"
        );

        let list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: a}, spec: {containers: [{name: c}]}}\n- {apiVersion: v1, kind: Pod, metadata: {name: b}, spec: {containers: [{name: c}]}}\n";
        let docs = documents(list, "l").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].origin, "l.items[1]");

        let deploy = GOOD.replace("kind: Pod", "kind: Deployment");
        let err = documents(&format!("{svc}---\n{deploy}"), "d")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("d#2") && err.contains("kind `Deployment` needs a controller"),
            "{err}"
        );
        let err = documents("kind: ConfigMap\n", "c").unwrap_err().to_string();
        assert!(err.contains("runs `Pod` and `Service`"), "{err}");
        assert!(documents("", "e").is_err());
    }

    #[test]
    fn restart_policies() {
        assert!(RestartPolicy::Always.restarts(0));
        assert!(RestartPolicy::OnFailure.restarts(3));
        assert!(!RestartPolicy::OnFailure.restarts(0));
        assert!(!RestartPolicy::Never.restarts(137));
    }
}
