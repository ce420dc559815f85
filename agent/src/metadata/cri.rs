//! Names from the container runtime over CRI: container id → container name,
//! pod name, namespace and uid (kubelet's `io.kubernetes.*` labels on every
//! container), without asking the API server. The client (`Cri`) is the
//! daemon's (feature `daemon`); the sockets and the metadata types are
//! everyone's.

use std::path::PathBuf;
#[cfg(feature = "daemon")]
use std::{path::Path, time::Duration};

#[cfg(feature = "daemon")]
use cri::{RuntimeServiceClient, v1};
#[cfg(feature = "daemon")]
use tonic::transport::Channel;

/// Where runtimes put their CRI socket, most common first.
pub const KNOWN_SOCKETS: &[&str] = &[
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/var/run/crio/crio.sock",
    "/run/k3s/containerd/containerd.sock",
    "/run/cri-dockerd.sock",
    "/var/run/cri-dockerd.sock",
    // This project's test node (testnode/): last, so a real runtime wins.
    "/run/podscope-node/containerd.sock",
];

/// The first known CRI socket that exists on this node.
pub fn detect_socket() -> Option<PathBuf> {
    KNOWN_SOCKETS.iter().map(PathBuf::from).find(|p| p.exists())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerMeta {
    pub id: String,
    pub name: String,
    pub attempt: u32,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub sandbox_id: String,
    /// kubelet's `io.kubernetes.pod.terminationGracePeriod` annotation.
    pub pod_grace_seconds: Option<i64>,
    /// kubelet's `io.kubernetes.container.preStopHandler` annotation (JSON).
    pub pre_stop_handler: Option<String>,
    /// kubelet's `io.kubernetes.container.type` annotation: `init`,
    /// `container` or `ephemeral` (absent from older kubelets).
    pub container_type: Option<String>,
    /// kubelet's `io.kubernetes.container.ports` annotation (JSON).
    pub ports: Option<String>,
    /// The runtime lists it as exited.
    pub exited: bool,
}

/// How the runtime reported a container's end (CRI ContainerStatus): what
/// kubelet copies into the pod's status, so what `kubectl` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeEnd {
    pub exit_code: i32,
    /// `Completed`, `Error`, `OOMKilled`, … as the runtime chose it.
    pub reason: String,
    pub message: String,
}

/// What CRI says about one pod sandbox (its pause container's id is the sandbox id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxMeta {
    pub id: String,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
}

#[cfg(feature = "daemon")]
/// The largest CRI answer accepted (ListContainers on a full node).
pub const MAX_MESSAGE: usize = 64 << 20;

#[cfg(feature = "daemon")]
pub struct Cri {
    socket: PathBuf,
    client: RuntimeServiceClient<Channel>,
}

#[cfg(feature = "daemon")]
impl Cri {
    pub async fn connect(socket: &Path) -> Result<Cri, String> {
        let client = cri::connect(socket, Duration::from_secs(2))
            .await
            .map_err(|e| e.to_string())?
            // tonic's default of 4 MiB is exceeded by a node with hundreds
            // of pods with large annotations: a listing must not fail then.
            .max_decoding_message_size(MAX_MESSAGE);
        Ok(Cri {
            socket: socket.to_path_buf(),
            client,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every container the runtime knows, running or exited.
    pub async fn containers(&mut self) -> Result<Vec<ContainerMeta>, String> {
        let resp = self
            .client
            .list_containers(v1::ListContainersRequest { filter: None })
            .await
            .map_err(|s| failed("ListContainers", &self.socket, &s))?;
        Ok(resp
            .into_inner()
            .containers
            .into_iter()
            .map(container_meta)
            .collect())
    }

    /// Every pod sandbox the runtime knows.
    pub async fn sandboxes(&mut self) -> Result<Vec<SandboxMeta>, String> {
        let resp = self
            .client
            .list_pod_sandbox(v1::ListPodSandboxRequest { filter: None })
            .await
            .map_err(|s| failed("ListPodSandbox", &self.socket, &s))?;
        Ok(resp
            .into_inner()
            .items
            .into_iter()
            .map(|s| {
                let m = s.metadata.unwrap_or_default();
                SandboxMeta {
                    id: s.id,
                    namespace: m.namespace,
                    pod: m.name,
                    pod_uid: m.uid,
                }
            })
            .collect())
    }
}

#[cfg(feature = "daemon")]
impl Cri {
    /// The runtime's container event stream (GetContainerEvents, CRI v1
    /// since Kubernetes 1.26); Err(true) when the runtime does not have it.
    pub async fn events(
        &mut self,
    ) -> Result<impl futures_util::Stream<Item = v1::ContainerEventResponse> + use<>, bool> {
        match self
            .client
            .get_container_events(v1::GetEventsRequest {})
            .await
        {
            Ok(resp) => {
                use futures_util::StreamExt;
                Ok(resp
                    .into_inner()
                    .take_while(|r| std::future::ready(r.is_ok()))
                    .filter_map(|r| std::future::ready(r.ok())))
            }
            Err(s) => Err(s.code() == tonic::Code::Unimplemented),
        }
    }

    /// How an exited container ended, as the runtime reports it
    /// (ContainerStatus); None while it has not exited, or once removed.
    pub async fn container_end(&mut self, id: &str) -> Result<Option<RuntimeEnd>, String> {
        let resp = self
            .client
            .container_status(v1::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await;
        // Removed since it was listed: no end to tell, not a failure.
        let resp = match resp {
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            r => r.map_err(|s| failed("ContainerStatus", &self.socket, &s))?,
        };
        Ok(resp
            .into_inner()
            .status
            .filter(|s| s.state == v1::ContainerState::ContainerExited as i32)
            .map(|s| RuntimeEnd {
                exit_code: s.exit_code,
                reason: s.reason,
                message: s.message,
            }))
    }

    /// A sandbox's pod IPs (PodSandboxStatus: the primary and any additional).
    pub async fn sandbox_ips(&mut self, id: &str) -> Result<Vec<std::net::IpAddr>, String> {
        let resp = self
            .client
            .pod_sandbox_status(v1::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: false,
            })
            .await
            .map_err(|s| failed("PodSandboxStatus", &self.socket, &s))?;
        let net = resp.into_inner().status.and_then(|s| s.network);
        Ok(net
            .map(|n| {
                std::iter::once(n.ip)
                    .chain(n.additional_ips.into_iter().map(|i| i.ip))
                    .filter_map(|ip| ip.parse().ok())
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// A failed call, named with the socket it went to.
#[cfg(feature = "daemon")]
fn failed(rpc: &str, socket: &Path, s: &tonic::Status) -> String {
    format!("{rpc} on {}: {}", socket.display(), s.message())
}

#[cfg(feature = "daemon")]
fn container_meta(c: v1::Container) -> ContainerMeta {
    let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
    let meta = c.metadata.clone().unwrap_or_default();
    ContainerMeta {
        name: if meta.name.is_empty() {
            label("io.kubernetes.container.name")
        } else {
            meta.name
        },
        attempt: meta.attempt,
        namespace: label("io.kubernetes.pod.namespace"),
        pod: label("io.kubernetes.pod.name"),
        pod_uid: label("io.kubernetes.pod.uid"),
        sandbox_id: c.pod_sandbox_id.clone(),
        pod_grace_seconds: c
            .annotations
            .get("io.kubernetes.pod.terminationGracePeriod")
            .and_then(|g| g.parse().ok()),
        pre_stop_handler: c
            .annotations
            .get("io.kubernetes.container.preStopHandler")
            .cloned(),
        container_type: c.annotations.get("io.kubernetes.container.type").cloned(),
        ports: c.annotations.get("io.kubernetes.container.ports").cloned(),
        exited: c.state == v1::ContainerState::ContainerExited as i32,
        id: c.id,
    }
}
