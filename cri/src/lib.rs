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

pub use v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};

#[derive(Debug, Error)]
pub enum CriError {
    #[error("no CRI socket at {0}")]
    NoSocket(String),
    #[error("cannot connect to the CRI socket {path}: {detail}")]
    Connect { path: String, detail: String },
}

fn endpoint(timeout: Duration) -> Endpoint {
    // tonic wants a URI; the connector ignores it and dials the socket.
    Endpoint::from_static("http://cri.invalid")
        .connect_timeout(timeout.min(Duration::from_secs(2)))
        .timeout(timeout)
}

fn connector(
    path: std::path::PathBuf,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send {
    tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            tokio::net::UnixStream::connect(path)
                .await
                .map(TokioIo::new)
        }
    })
}

/// A channel that dials on first use and redials after the runtime restarts:
/// what a long-running client needs. Each call fails while the socket is gone.
pub fn lazy_channel(socket: &Path, timeout: Duration) -> Channel {
    endpoint(timeout).connect_with_connector_lazy(connector(socket.to_path_buf()))
}

/// A channel connected now: fails at once when the runtime does not answer.
pub async fn channel(socket: &Path, timeout: Duration) -> Result<Channel, CriError> {
    if !socket.exists() {
        return Err(CriError::NoSocket(socket.display().to_string()));
    }
    endpoint(timeout)
        .connect_with_connector(connector(socket.to_path_buf()))
        .await
        .map_err(|e| CriError::Connect {
            path: socket.display().to_string(),
            detail: error_chain(&e),
        })
}

/// The runtime service of a runtime's CRI socket, connected lazily; an
/// absent socket is an error at once.
pub async fn connect(
    socket: &Path,
    timeout: Duration,
) -> Result<RuntimeServiceClient<Channel>, CriError> {
    if !socket.exists() {
        return Err(CriError::NoSocket(socket.display().to_string()));
    }
    Ok(RuntimeServiceClient::new(lazy_channel(socket, timeout)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
