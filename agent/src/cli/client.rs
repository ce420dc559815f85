//! How the CLI reaches the agent on its node: HTTP over the agent's unix
//! socket (`--api-socket`, by default /run/podscope/api.sock, root's), so
//! `podscope why` and `doctor` need no flags there. `--agent` points
//! elsewhere: another socket path, `https://HOST:PORT` (an agent's
//! `--api-listen`, with `--agent-ca` and `--agent-token-file`), or
//! `HOST:PORT` / `http://HOST:PORT` (plain HTTP: the metrics listener
//! answers `/readyz` for doctor, never the node-wide API).
//!
//! A plain HTTP/1.0 GET: the answers are small and local, so no HTTP client
//! library is needed.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpStream, ToSocketAddrs},
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;

use crate::daemon::config::DEFAULT_API_SOCKET;

/// Where the agent is, as `--agent` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The agent's unix socket.
    Unix(PathBuf),
    /// Plain HTTP on TCP.
    Http { host: String, port: u16 },
    /// HTTPS on TCP: an agent's `--api-listen`.
    Https { host: String, port: u16 },
}

impl Endpoint {
    /// `/path` or `unix:/path`; `https://HOST:PORT`; `http://HOST:PORT` or
    /// `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let bad = || {
            format!(
                "{s:?} is not a socket path (/run/podscope/api.sock), https://HOST:PORT or HOST:PORT"
            )
        };
        if let Some(p) = s.strip_prefix("unix:") {
            return if p.is_empty() {
                Err(bad())
            } else {
                Ok(Endpoint::Unix(p.into()))
            };
        }
        if s.starts_with('/') || s.starts_with("./") {
            return Ok(Endpoint::Unix(s.into()));
        }
        let (tls, rest) = match (s.strip_prefix("https://"), s.strip_prefix("http://")) {
            (Some(r), _) => (true, r),
            (None, Some(r)) => (false, r),
            (None, None) => (false, s),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains('/') {
            return Err(bad());
        }
        let host = host.to_string();
        Ok(if tls {
            Endpoint::Https { host, port }
        } else {
            Endpoint::Http { host, port }
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bracket = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_string()
            }
        };
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Http { host, port } => write!(f, "{}:{port}", bracket(host)),
            Endpoint::Https { host, port } => write!(f, "https://{}:{port}", bracket(host)),
        }
    }
}

/// The flags of every command that asks the agent.
#[derive(Args, Debug, Clone)]
pub struct AgentFlags {
    /// Where the agent serves its API: its unix socket (the agent's
    /// --api-socket; root's), https://HOST:PORT (its --api-listen), or
    /// HOST:PORT (plain HTTP: its --listen, which serves no node-wide data).
    #[arg(
        long,
        value_name = "SOCKET|URL",
        env = "PODSCOPE_AGENT",
        default_value = DEFAULT_API_SOCKET,
        value_parser = Endpoint::parse
    )]
    pub agent: Endpoint,
    /// For https://: the CA certificate (PEM) that signed the agent's
    /// --api-tls-cert.
    #[arg(long, value_name = "PEM", env = "PODSCOPE_AGENT_CA")]
    pub agent_ca: Option<PathBuf>,
    /// For https://: a file holding the token of the agent's --api-token-file.
    #[arg(long, value_name = "FILE", env = "PODSCOPE_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,
}

impl AgentFlags {
    /// The flags as if none were given: the local agent's socket.
    pub fn local() -> AgentFlags {
        AgentFlags {
            agent: Endpoint::Unix(DEFAULT_API_SOCKET.into()),
            agent_ca: None,
            agent_token_file: None,
        }
    }

    /// GETs `path` (with its query) and returns the body of a 200; anything
    /// else is one sentence naming the agent.
    pub fn get(&self, path: &str) -> Result<String> {
        let ep = &self.agent;
        let token = match &self.agent_token_file {
            Some(f) => {
                if !matches!(ep, Endpoint::Https { .. }) {
                    bail!(
                        "--agent-token-file goes with --agent https://HOST:PORT: a token is never sent over plain HTTP"
                    );
                }
                let t = std::fs::read(f)
                    .with_context(|| format!("cannot read the token file {}", f.display()))?;
                let t = String::from_utf8(t.trim_ascii().to_vec())
                    .map_err(|_| anyhow!("the token file {} is not text", f.display()))?;
                Some(t)
            }
            None => None,
        };
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let host = match ep {
            Endpoint::Unix(_) => "localhost".to_string(),
            Endpoint::Http { host, port } | Endpoint::Https { host, port } => {
                format!("{host}:{port}")
            }
        };
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n{auth}\r\n"
        );
        let raw = match ep {
            Endpoint::Unix(p) => {
                let conn = UnixStream::connect(p).map_err(|e| unreachable_socket(ep, &e))?;
                exchange(conn, &request, ep)?
            }
            Endpoint::Http { host, port } => exchange(connect(host, *port, ep)?, &request, ep)?,
            Endpoint::Https { host, port } => {
                let Some(ca) = &self.agent_ca else {
                    bail!(
                        "--agent {ep} needs --agent-ca PEM: the CA certificate that signed the agent's --api-tls-cert"
                    );
                };
                let tls = tls_client(ca, host)?;
                let tcp = connect(host, *port, ep)?;
                exchange(rustls::StreamOwned::new(tls, tcp), &request, ep)?
            }
        };
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("the agent at {ep} sent an incomplete answer"))?;
        let status = head.split(' ').nth(1).unwrap_or("");
        match status {
            "200" => Ok(body.to_string()),
            "401" => bail!(
                "the agent at {ep} refused the request (401): it needs its bearer token (--agent-token-file)"
            ),
            _ => bail!(
                "the agent at {ep} answered {}: {}",
                head.lines().next().unwrap_or(""),
                body.trim()
            ),
        }
    }
}

/// Why the agent's socket cannot be used, in one sentence that says what to do.
fn unreachable_socket(ep: &Endpoint, e: &std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        ErrorKind::NotFound => {
            "no such socket: is `podscope agent` running on this node? (or --agent SOCKET|https://HOST:PORT)"
        }
        ErrorKind::PermissionDenied => {
            "permission denied: the node-wide data is root's; run it as root on the node, or `kubectl -n podscope exec ds/podscope -c agent -- podscope …`"
        }
        ErrorKind::ConnectionRefused => {
            "nothing listens on it: is `podscope agent` running on this node?"
        }
        _ => return anyhow!("cannot reach the podscope agent at {ep} ({e})"),
    };
    anyhow!("cannot reach the podscope agent at {ep}: {hint}")
}

fn connect(host: &str, port: u16, ep: &Endpoint) -> Result<TcpStream> {
    let unreachable = |e: std::io::Error| {
        anyhow!(
            "cannot reach the podscope agent at {ep} ({e}): is `podscope agent` running there? (--agent SOCKET|https://HOST:PORT)"
        )
    };
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(unreachable)?
        .collect();
    let mut last = std::io::Error::new(ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(unreachable(last))
}

/// Sends the request and reads the answer to its end (HTTP/1.0: the agent
/// closes the connection after it).
fn exchange(
    mut conn: impl Read + Write + Timeouts,
    request: &str,
    ep: &Endpoint,
) -> Result<Vec<u8>> {
    conn.timeouts(Duration::from_secs(10))?;
    conn.write_all(request.as_bytes())
        .and_then(|()| conn.flush())
        .with_context(|| format!("sending the request to the agent at {ep}"))?;
    let mut raw = vec![];
    match conn.read_to_end(&mut raw) {
        Ok(_) => Ok(raw),
        // A TLS peer that closes without close_notify: the answer is
        // complete for HTTP/1.0 once the connection ends.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        Err(e) => Err(e).with_context(|| format!("reading the agent's answer from {ep}")),
    }
}

/// Read and write deadlines on whatever carries the request.
trait Timeouts {
    fn timeouts(&self, d: Duration) -> std::io::Result<()>;
}

impl Timeouts for TcpStream {
    fn timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

impl Timeouts for UnixStream {
    fn timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

impl Timeouts for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.sock.timeouts(d)
    }
}

/// A TLS client that trusts only `ca` and checks the agent's name (`host`).
fn tls_client(ca: &std::path::Path, host: &str) -> Result<rustls::ClientConnection> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("cannot read the CA {} (--agent-ca): {e}", ca.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate (--agent-ca)", ca.display());
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| anyhow!("{}: not a usable CA certificate: {e}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| anyhow!("{host} is not a name a certificate can have: {e}"))?;
    rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| anyhow!("TLS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_addresses_in_every_form() {
        let unix = |p: &str| Ok(Endpoint::Unix(p.into()));
        assert_eq!(
            Endpoint::parse(DEFAULT_API_SOCKET),
            unix(DEFAULT_API_SOCKET)
        );
        assert_eq!(Endpoint::parse("unix:/tmp/a.sock"), unix("/tmp/a.sock"));
        assert_eq!(
            Endpoint::parse("127.0.0.1:9811"),
            Ok(Endpoint::Http {
                host: "127.0.0.1".into(),
                port: 9811
            })
        );
        assert_eq!(
            Endpoint::parse("https://node-1:9812/"),
            Ok(Endpoint::Https {
                host: "node-1".into(),
                port: 9812
            })
        );
        assert_eq!(
            Endpoint::parse("https://[::1]:9812"),
            Ok(Endpoint::Https {
                host: "::1".into(),
                port: 9812
            })
        );
        for bad in [
            "",
            "unix:",
            "node",
            "http://node",
            "https://:1",
            "a/b:1",
            "h:99999",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Endpoint::parse("https://[::1]:9812").unwrap().to_string(),
            "https://[::1]:9812"
        );
        assert_eq!(
            Endpoint::parse("127.0.0.1:9811").unwrap().to_string(),
            "127.0.0.1:9811"
        );
    }
}
