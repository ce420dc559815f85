//! The CRI API (runtime.v1): the gRPC interface between kubelet and the
//! container runtime (containerd, CRI-O, cri-dockerd), over a unix socket.
//!
//! podscope's agent reads names from it (pods, containers, labels); the test
//! node plays kubelet with it.

use std::{path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tonic::transport::{Channel, Endpoint, Uri};

/// Generated from proto/cri-api-v1.proto.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("runtime.v1");
}

pub use v1::runtime_service_client::RuntimeServiceClient;

#[derive(Debug, Error)]
pub enum CriError {
    #[error("no CRI socket at {0}")]
    NoSocket(String),
    #[error("cannot connect to the CRI socket {path}: {detail}")]
    Connect { path: String, detail: String },
}

/// Connects to a runtime's CRI socket. The connection is lazy: a runtime that
/// restarts later is reconnected on the next call.
pub async fn connect(
    socket: &Path,
    timeout: Duration,
) -> Result<RuntimeServiceClient<Channel>, CriError> {
    if !socket.exists() {
        return Err(CriError::NoSocket(socket.display().to_string()));
    }
    let path = socket.to_path_buf();
    // The URI is required by tonic but unused: every connection goes to the socket.
    let channel = Endpoint::try_from("http://[::1]:50051")
        .map_err(|e| CriError::Connect {
            path: socket.display().to_string(),
            detail: e.to_string(),
        })?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }));
    Ok(RuntimeServiceClient::new(channel))
}
