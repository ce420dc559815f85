//! The HTTP listeners, hardened for a node agent: a cap on open connections
//! (beyond it new ones are closed at once, counted), a deadline for a
//! request's headers (a client that sends half a request is dropped), and a
//! deadline on every write (a reader that stops reading is disconnected).
//! The same code serves TCP (`/metrics`; the API with `--api-listen`) and
//! the API's unix socket. It runs on the async runtime beside the drain
//! thread, never on it.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::Semaphore,
    time::Sleep,
};

/// A listener the server accepts connections from.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection to serve.
    fn next(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;
    async fn next(&self) -> std::io::Result<TcpStream> {
        let (s, _) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Accept for UnixListener {
    type Io = UnixStream;
    /// Only this process's user (and root) get past here, whatever the
    /// socket file's mode became: a second lock behind its 0600.
    async fn next(&self) -> std::io::Result<UnixStream> {
        // SAFETY: geteuid(2) cannot fail.
        let me = unsafe { libc::geteuid() };
        loop {
            let (s, _) = self.accept().await?;
            match s.peer_cred() {
                Ok(c) if c.uid() == 0 || c.uid() == me => return Ok(s),
                Ok(c) => tracing::debug!("API socket: refused a client of uid {}", c.uid()),
                Err(e) => tracing::debug!("API socket: no peer credentials: {e}"),
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// How long one write may wait for the client to read.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            header_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `router` until `shutdown` resolves; then open connections are
/// dropped (the caller has a deadline to keep).
pub async fn serve<L: Accept>(
    listener: L,
    router: Router,
    tls: Option<Arc<super::tls::ListenerTls>>,
    limits: Limits,
    refused: Counter,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.next() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: wait a little rather than spin.
                    tracing::debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.inc();
            drop(stream);
            continue;
        };
        let router = router.clone();
        let limits = limits.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let io = WriteDeadline::new(stream, limits.write_timeout);
            match tls {
                Some(tls) => {
                    super::tls::serve_connection(io, &tls, router, limits.header_timeout).await
                }
                None => {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(limits.header_timeout)
                        .serve_connection(TokioIo::new(io), TowerToHyperService::new(router));
                    if let Err(e) = conn.await {
                        tracing::debug!("http connection: {e}");
                    }
                }
            }
            drop(slot);
        });
    }
    conns.abort_all();
}

/// A stream whose writes fail once one has waited `timeout` without progress.
struct WriteDeadline<S> {
    inner: S,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WriteDeadline<S> {
    fn new(inner: S, timeout: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            timeout,
            sleep: None,
        }
    }

    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match r {
            Poll::Ready(v) => {
                self.sleep = None;
                Poll::Ready(v)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client did not read for too long",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.guard(cx, r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.guard(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
