//! TLS with authentication for the agent's TCP listeners: the metrics
//! listener (`--metrics-tls-*`, optional) and the node-wide API on TCP
//! (`--api-listen` with `--api-tls-*`, mandatory there). A client
//! certificate (`--…-client-ca`) or a bearer token (`--…-token-file`) is
//! required for everything but the kubelet's probes (`/healthz`, `/readyz`,
//! which tell nothing about the node).
//!
//! The certificate, key, CA and token files are re-read when they change
//! (cert-manager and Kubernetes Secrets replace them in place), checked at
//! most once a second when a connection arrives; a file that fails to load
//! keeps the previous one in use and is logged. The token is compared in
//! constant time.
//!
//! A client certificate is asked for but not required during the
//! handshake, so that a kubelet probe without one still reaches /healthz;
//! anything else then answers 401 unless the handshake verified a
//! certificate against the CA or the request carries the token.
//!
//! The daemon's hook is [`serve_connection`], called by the listener
//! (`server::serve`) for each accepted connection.

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    body::Body,
    http::{Request, Response, StatusCode, header},
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use subtle::ConstantTimeEq;
use tower::ServiceExt;

/// Which listener a TLS configuration is for: it names the flags in
/// messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// `--listen`: `/metrics` (TLS optional).
    Metrics,
    /// `--api-listen`: the node-wide API on TCP (TLS required).
    Api,
}

impl Listener {
    /// The flags' prefix: `--metrics-tls-cert`, `--api-token-file`, …
    pub fn prefix(self) -> &'static str {
        match self {
            Listener::Metrics => "metrics",
            Listener::Api => "api",
        }
    }

    /// What anyone could do without authentication.
    fn exposure(self) -> &'static str {
        match self {
            Listener::Metrics => "anyone could scrape",
            Listener::Api => "anyone who reaches it could read every pod's events and terminations",
        }
    }
}

/// The files, as configured (flags, environment or config file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub listener: Listener,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Checks that the settings make sense together: TLS needs both a
    /// certificate and a key, and an authentication method; credentials are
    /// never accepted over plain HTTP. None: no TLS settings at all.
    pub fn resolve(
        listener: Listener,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
        token_file: Option<PathBuf>,
    ) -> Result<Option<TlsConfig>, String> {
        let p = listener.prefix();
        match (cert, key) {
            (None, None) if client_ca.is_none() && token_file.is_none() => Ok(None),
            (None, None) => Err(format!(
                "--{p}-client-ca and --{p}-token-file need --{p}-tls-cert and --{p}-tls-key: credentials are never taken over plain HTTP"
            )),
            (Some(_), None) | (None, Some(_)) => {
                Err(format!("--{p}-tls-cert and --{p}-tls-key go together"))
            }
            (Some(cert), Some(key)) => {
                if client_ca.is_none() && token_file.is_none() {
                    return Err(format!(
                        "TLS on the {p} listener needs --{p}-client-ca or --{p}-token-file (or both): without one {}",
                        listener.exposure()
                    ));
                }
                Ok(Some(TlsConfig {
                    listener,
                    cert,
                    key,
                    client_ca,
                    token_file,
                }))
            }
        }
    }
}

/// What is in force: the TLS configuration and the token, from the files
/// as they were when last read.
struct Loaded {
    server: Arc<ServerConfig>,
    token: Option<Vec<u8>>,
    stamps: Vec<Option<Stamp>>,
    checked: Instant,
}

/// A file's identity and change time: a Secret update swaps a symlink, a
/// cert-manager renewal rewrites the file; either changes this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

fn stamp(p: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some(Stamp {
        modified: m.modified().ok()?,
        len: m.len(),
        inode: m.ino(),
    })
}

/// A listener's TLS and authentication, reloaded as files change.
pub struct ListenerTls {
    cfg: TlsConfig,
    loaded: Mutex<Loaded>,
}

impl ListenerTls {
    /// Reads every file once; an error here is one sentence and the agent
    /// does not start.
    pub fn load(cfg: &TlsConfig) -> Result<Arc<ListenerTls>, String> {
        let loaded = load(cfg)?;
        Ok(Arc::new(ListenerTls {
            cfg: cfg.clone(),
            loaded: Mutex::new(loaded),
        }))
    }

    fn files(&self) -> Vec<&Path> {
        files(&self.cfg)
    }

    /// The configuration in force, re-read first if a file changed.
    fn current(&self) -> (Arc<ServerConfig>, Option<Vec<u8>>) {
        // A panic elsewhere cannot leave this half-written: take it as is.
        let mut l = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if l.checked.elapsed() >= Duration::from_secs(1) {
            l.checked = Instant::now();
            let now: Vec<Option<Stamp>> = self.files().iter().map(|p| stamp(p)).collect();
            if now != l.stamps {
                match load(&self.cfg) {
                    Ok(new) => {
                        tracing::info!(
                            "{} TLS: reloaded the changed certificate, key, CA or token file",
                            self.cfg.listener.prefix()
                        );
                        *l = new;
                    }
                    Err(e) => {
                        // Keep serving with what worked; retry at the next change.
                        tracing::warn!(
                            "{} TLS: {e}; still using the previous files",
                            self.cfg.listener.prefix()
                        );
                        l.stamps = now;
                    }
                }
            }
        }
        (l.server.clone(), l.token.clone())
    }
}

fn files(cfg: &TlsConfig) -> Vec<&Path> {
    let mut f = vec![cfg.cert.as_path(), cfg.key.as_path()];
    f.extend(cfg.client_ca.as_deref());
    f.extend(cfg.token_file.as_deref());
    f
}

fn load(cfg: &TlsConfig) -> Result<Loaded, String> {
    // Stamps first: a change while reading is seen at the next check.
    let stamps = files(cfg).iter().map(|p| stamp(p)).collect();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the certificate {}: {e}", cfg.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (--{}-tls-cert)",
            cfg.cert.display(),
            cfg.listener.prefix()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .map_err(|e| format!("cannot read the private key {}: {e}", cfg.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read the client CA {}: {e}", ca.display()))?;
            for c in cas {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                // Probes without a certificate still reach /healthz; /metrics checks.
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let server = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "the certificate {} and key {} do not make a TLS identity: {e}",
            cfg.cert.display(),
            cfg.key.display()
        )
    })?;
    let token = match &cfg.token_file {
        Some(p) => {
            let t = std::fs::read(p)
                .map_err(|e| format!("cannot read the token file {}: {e}", p.display()))?;
            let t = t.trim_ascii().to_vec();
            if t.is_empty() {
                return Err(format!("the token file {} is empty", p.display()));
            }
            Some(t)
        }
        None => None,
    };
    Ok(Loaded {
        server: Arc::new(server),
        token,
        stamps,
        checked: Instant::now(),
    })
}

/// Paths anyone may read: the kubelet's probes, which reveal nothing.
fn is_open(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

/// Whether `Authorization: Bearer <token>` matches, in constant time.
fn bearer_matches(req: &Request<impl Sized>, token: &[u8]) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|given| bool::from(given.trim_ascii().ct_eq(token)))
}

fn unauthorized() -> Response<Body> {
    let mut r = Response::new(Body::from(
        "a client certificate or a bearer token is required\n",
    ));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// Serves one accepted connection over TLS with authentication: the
/// handshake within `handshake_timeout`, then HTTP/1.1 with the header
/// deadline; `/healthz` and `/readyz` are open, anything else needs a
/// verified client certificate or the bearer token.
pub async fn serve_connection<IO>(
    io: IO,
    tls: &ListenerTls,
    router: Router,
    header_timeout: Duration,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (server, token) = tls.current();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let Ok(Ok(stream)) = tokio::time::timeout(header_timeout, acceptor.accept(io)).await else {
        return;
    };
    // The verifier accepted only certificates signed by the CA.
    let cert_ok = stream
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let router = router.clone();
        let allowed = cert_ok
            || is_open(req.uri().path())
            || token.as_deref().is_some_and(|t| bearer_matches(&req, t));
        async move {
            if !allowed {
                return Ok::<_, Infallible>(unauthorized());
            }
            router.oneshot(req).await
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_would_leak_or_cannot_work_are_refused() {
        let p = |s: &str| Some(PathBuf::from(s));
        let m = Listener::Metrics;
        assert_eq!(TlsConfig::resolve(m, None, None, None, None), Ok(None));
        assert!(
            TlsConfig::resolve(m, None, None, None, p("t"))
                .unwrap_err()
                .contains("plain HTTP")
        );
        assert!(
            TlsConfig::resolve(m, p("c"), None, p("ca"), None)
                .unwrap_err()
                .contains("go together")
        );
        assert!(
            TlsConfig::resolve(m, p("c"), p("k"), None, None)
                .unwrap_err()
                .contains("anyone could scrape")
        );
        assert!(
            TlsConfig::resolve(m, p("c"), p("k"), None, p("t"))
                .unwrap()
                .is_some()
        );
        // The API's flags are named as the API's.
        let err = TlsConfig::resolve(Listener::Api, None, None, None, p("t")).unwrap_err();
        assert!(
            err.starts_with("--api-client-ca and --api-token-file need --api-tls-cert"),
            "{err}"
        );
    }

    #[test]
    fn the_bearer_token_must_match_exactly() {
        let req = |h: Option<&str>| {
            let mut b = Request::get("/metrics");
            if let Some(h) = h {
                b = b.header(header::AUTHORIZATION, h);
            }
            b.body(()).unwrap()
        };
        assert!(bearer_matches(&req(Some("Bearer s3cret")), b"s3cret"));
        assert!(!bearer_matches(&req(Some("Bearer s3cre")), b"s3cret"));
        assert!(!bearer_matches(&req(Some("Bearer s3cret2")), b"s3cret"));
        assert!(!bearer_matches(&req(Some("Basic s3cret")), b"s3cret"));
        assert!(!bearer_matches(&req(None), b"s3cret"));
        assert!(is_open("/healthz") && is_open("/readyz") && !is_open("/metrics"));
    }
}
