//! A CRI client (runtime.v1) over containerd's unix socket: the same gRPC
//! API kubelet speaks. The generated API and the socket dialing come from the
//! workspace's `cri` crate, which the agent uses too.

use std::{path::Path, time::Duration};

/// The CRI API (`k8s.io/cri-api`, package runtime.v1).
pub use ::cri::v1 as api;
use ::cri::{ImageServiceClient, RuntimeServiceClient};
use tonic::transport::Channel;

/// How long one CRI call may take (image imports are the slow ones).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error(
        "cannot reach containerd's CRI socket {socket}: {message} (is the node up? run `podscope-testnode up`)"
    )]
    Connect { socket: String, message: String },
    #[error("CRI {call} failed: {status}")]
    Call {
        call: &'static str,
        status: Box<tonic::Status>,
    },
}

impl CriError {
    pub fn call(call: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
        move |status| CriError::Call {
            call,
            status: Box::new(status),
        }
    }

    /// The runtime said the object does not exist (already removed).
    pub fn is_not_found(&self) -> bool {
        match self {
            CriError::Call { status, .. } => {
                status.code() == tonic::Code::NotFound || status.message().contains("not found")
            }
            CriError::Connect { .. } => false,
        }
    }
}

/// Both CRI services on one connection.
#[derive(Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects now and fails if containerd does not answer `Version`.
    pub async fn connect(socket: &str) -> Result<Cri, CriError> {
        let channel = ::cri::channel(Path::new(socket), CALL_TIMEOUT)
            .await
            .map_err(|e| CriError::Connect {
                socket: socket.to_string(),
                message: e.to_string(),
            })?;
        let mut cri = Cri::from_channel(channel);
        cri.version().await.map_err(|e| CriError::Connect {
            socket: socket.to_string(),
            message: e.to_string(),
        })?;
        Ok(cri)
    }

    /// A client that dials on first use and redials after containerd
    /// restarts: what the long-running kubelet daemon needs.
    pub fn lazy(socket: &str) -> Cri {
        Cri::from_channel(::cri::lazy_channel(Path::new(socket), CALL_TIMEOUT))
    }

    fn from_channel(channel: Channel) -> Cri {
        Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }

    /// The runtime's name and version, e.g. `containerd v1.6.20`.
    pub async fn version(&mut self) -> Result<String, CriError> {
        let v = self
            .runtime
            .version(api::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(CriError::call("Version"))?
            .into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// The image's id (`sha256:<config digest>`), or None when absent.
    pub async fn image_id(&mut self, image: &str) -> Result<Option<String>, CriError> {
        let r = self
            .images
            .image_status(api::ImageStatusRequest {
                image: Some(api::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .map_err(CriError::call("ImageStatus"))?
            .into_inner();
        Ok(r.image.map(|i| i.id))
    }

    pub async fn list_sandboxes(&mut self) -> Result<Vec<api::PodSandbox>, CriError> {
        Ok(self
            .runtime
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await
            .map_err(CriError::call("ListPodSandbox"))?
            .into_inner()
            .items)
    }

    pub async fn list_containers(&mut self) -> Result<Vec<api::Container>, CriError> {
        Ok(self
            .runtime
            .list_containers(api::ListContainersRequest { filter: None })
            .await
            .map_err(CriError::call("ListContainers"))?
            .into_inner()
            .containers)
    }

    /// The sandbox's status plus containerd's verbose `info` JSON (which
    /// carries the runtime spec, hence the network namespace path).
    pub async fn sandbox_status(
        &mut self,
        id: &str,
    ) -> Result<(api::PodSandboxStatus, Option<serde_json::Value>), CriError> {
        let r = self
            .runtime
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            })
            .await
            .map_err(CriError::call("PodSandboxStatus"))?
            .into_inner();
        let info = r
            .info
            .get("info")
            .and_then(|s| serde_json::from_str(s).ok());
        Ok((r.status.unwrap_or_default(), info))
    }

    /// The container's status plus containerd's verbose `info` JSON (pid,
    /// runtime spec with the cgroups path).
    pub async fn container_status(
        &mut self,
        id: &str,
    ) -> Result<(api::ContainerStatus, Option<serde_json::Value>), CriError> {
        let r = self
            .runtime
            .container_status(api::ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            })
            .await
            .map_err(CriError::call("ContainerStatus"))?
            .into_inner();
        let info = r
            .info
            .get("info")
            .and_then(|s| serde_json::from_str(s).ok());
        Ok((r.status.unwrap_or_default(), info))
    }

    /// Stops the containers (SIGKILL, no grace) and tears down the network.
    pub async fn stop_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        self.runtime
            .stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map_err(CriError::call("StopPodSandbox"))?;
        Ok(())
    }

    pub async fn remove_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        self.runtime
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map_err(CriError::call("RemovePodSandbox"))?;
        Ok(())
    }

    /// StopContainer: the image's stop signal (SIGTERM), then SIGKILL after
    /// `grace` seconds, exactly as kubelet asks for a pod's grace period.
    pub async fn stop_container(&mut self, id: &str, grace: i64) -> Result<(), CriError> {
        let mut req = tonic::Request::new(api::StopContainerRequest {
            container_id: id.into(),
            timeout: grace,
        });
        req.set_timeout(Duration::from_secs(grace.max(0) as u64 + 30));
        self.runtime
            .stop_container(req)
            .await
            .map_err(CriError::call("StopContainer"))?;
        Ok(())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<(), CriError> {
        self.runtime
            .remove_container(api::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .map_err(CriError::call("RemoveContainer"))?;
        Ok(())
    }

    /// ExecSync: runs `cmd` in the container and returns (exit code, stdout,
    /// stderr); a zero `timeout` lets it run until it ends.
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), CriError> {
        let mut req = tonic::Request::new(api::ExecSyncRequest {
            container_id: id.into(),
            cmd,
            timeout: timeout.as_secs() as i64,
        });
        // Zero is no timeout in CRI (kubelet's hooks): bound only the call.
        req.set_timeout(if timeout.is_zero() {
            Duration::from_secs(3600)
        } else {
            timeout + Duration::from_secs(10)
        });
        let r = self
            .runtime
            .exec_sync(req)
            .await
            .map_err(CriError::call("ExecSync"))?
            .into_inner();
        Ok((r.exit_code, r.stdout, r.stderr))
    }
}

/// An error and its causes on one line (tonic's transport errors hide the
/// useful part, such as "No such file or directory", in their sources).
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
