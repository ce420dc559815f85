//! The agent's configuration: defaults < config file (TOML) < environment <
//! flags. Anything invalid is one sentence and exit status 2.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;
use serde::Deserialize;
use thiserror::Error;

use crate::cli::parse_duration;

#[derive(Args, Debug, Default, Clone)]
pub struct AgentArgs {
    /// A TOML file with any of the settings below (flags and environment win).
    #[arg(long, env = "PODSCOPE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where to serve /metrics, /healthz and /readyz [default: 0.0.0.0:9811].
    /// The node-wide API (/api/v1/…) is not served here: see --api-socket.
    #[arg(long, env = "PODSCOPE_LISTEN")]
    pub listen: Option<String>,
    /// The unix socket (0600, in a 0700 directory, root's) that serves the
    /// node-wide API (/api/v1/events, /api/v1/terminations) to `podscope
    /// why` and `doctor` on the node [default: /run/podscope/api.sock].
    #[arg(long, value_name = "PATH", env = "PODSCOPE_API_SOCKET")]
    pub api_socket: Option<PathBuf>,
    /// Also serve the node-wide API on TCP at this address: only over TLS
    /// (--api-tls-cert, --api-tls-key) and with authentication
    /// (--api-token-file or --api-client-ca) [default: not on TCP].
    #[arg(long, value_name = "ADDR", env = "PODSCOPE_API_LISTEN")]
    pub api_listen: Option<String>,
    /// The certificate chain (PEM) of --api-listen, reloaded when it changes.
    #[arg(long, env = "PODSCOPE_API_TLS_CERT")]
    pub api_tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM) for --api-tls-cert.
    #[arg(long, env = "PODSCOPE_API_TLS_KEY")]
    pub api_tls_key: Option<PathBuf>,
    /// Clients of --api-listen must present a certificate signed by a CA in
    /// this PEM file (or the bearer token of --api-token-file).
    #[arg(long, env = "PODSCOPE_API_CLIENT_CA")]
    pub api_client_ca: Option<PathBuf>,
    /// Clients of --api-listen must send `Authorization: Bearer <the file's
    /// content>` (or a certificate of --api-client-ca); reread when it changes.
    #[arg(long, env = "PODSCOPE_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// The container runtime's CRI socket [default: the first of the usual places that exists].
    #[arg(long, env = "PODSCOPE_CRI_SOCKET")]
    pub cri_socket: Option<PathBuf>,
    /// Do not ask the runtime for names.
    #[arg(long)]
    pub no_cri: bool,
    /// Where the agent keeps state across restarts [default: /var/lib/podscope].
    #[arg(long, env = "PODSCOPE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// How long the series of a deleted pod stay [default: 10m].
    #[arg(long, env = "PODSCOPE_SERIES_RETENTION", value_parser = parse_duration)]
    pub series_retention: Option<Duration>,
    /// Most per-workload series; more are refused and counted [default: 50000].
    #[arg(long, env = "PODSCOPE_MAX_SERIES")]
    pub max_series: Option<usize>,
    /// Ring buffer size per busy event family (exits, signals, packets), bytes
    /// (a power of two ≥ 4096) [default: 512 KiB per CPU, 1 to 8 MiB].
    #[arg(long, env = "PODSCOPE_RING_BUFFER_SIZE")]
    pub ring_buffer_size: Option<u32>,
    /// This node's name, as Kubernetes knows it (the DaemonSet sets it from
    /// spec.nodeName) [default: the host name].
    #[arg(long, env = "PODSCOPE_NODE_NAME")]
    pub node_name: Option<String>,
    /// Most bytes the termination journal keeps on disk (in the state
    /// directory), oldest records dropped first [default: 16777216].
    #[arg(long, env = "PODSCOPE_JOURNAL_MAX_BYTES")]
    pub journal_max_bytes: Option<u64>,
    /// Most bytes of termination records kept in memory for `why` and the
    /// API, oldest dropped first and counted (the journal keeps its own
    /// history on disk) [default: 4194304].
    #[arg(long, env = "PODSCOPE_RECORDS_MEMORY_BYTES")]
    pub records_memory_bytes: Option<u64>,
    /// The network namespace where kube-proxy's rules live, e.g.
    /// /run/netns/podscope-node [default: the agent's own, right for a hostNetwork DaemonSet].
    #[arg(long, env = "PODSCOPE_NETNS")]
    pub netns: Option<PathBuf>,
    /// How long one read of kube-proxy's rules (`iptables-save`) may take
    /// before it is killed [default: 10s].
    #[arg(long, env = "PODSCOPE_RULES_TIMEOUT", value_parser = parse_duration)]
    pub rules_timeout: Option<Duration>,
    /// Serve /metrics over TLS with this certificate chain (PEM), reloaded
    /// when the file changes; needs --metrics-tls-key.
    #[arg(long, env = "PODSCOPE_METRICS_TLS_CERT")]
    pub metrics_tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM) for --metrics-tls-cert.
    #[arg(long, env = "PODSCOPE_METRICS_TLS_KEY")]
    pub metrics_tls_key: Option<PathBuf>,
    /// Scrapers must present a client certificate signed by a CA in this
    /// PEM file (or the bearer token of --metrics-token-file).
    #[arg(long, env = "PODSCOPE_METRICS_CLIENT_CA")]
    pub metrics_client_ca: Option<PathBuf>,
    /// Scrapers must send `Authorization: Bearer <the file's content>` (or a
    /// client certificate of --metrics-client-ca); reread when it changes.
    #[arg(long, env = "PODSCOPE_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<PathBuf>,
}

/// The config file's keys: the flags' names.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    listen: Option<String>,
    api_socket: Option<PathBuf>,
    api_listen: Option<String>,
    api_tls_cert: Option<PathBuf>,
    api_tls_key: Option<PathBuf>,
    api_client_ca: Option<PathBuf>,
    api_token_file: Option<PathBuf>,
    cri_socket: Option<PathBuf>,
    no_cri: Option<bool>,
    state_dir: Option<PathBuf>,
    series_retention: Option<String>,
    max_series: Option<usize>,
    ring_buffer_size: Option<u32>,
    node_name: Option<String>,
    journal_max_bytes: Option<u64>,
    records_memory_bytes: Option<u64>,
    netns: Option<PathBuf>,
    rules_timeout: Option<String>,
    metrics_tls_cert: Option<PathBuf>,
    metrics_tls_key: Option<PathBuf>,
    metrics_client_ca: Option<PathBuf>,
    metrics_token_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    /// The node-wide API's unix socket.
    pub api_socket: PathBuf,
    /// The node-wide API on TCP, with its TLS and authentication (None: the
    /// socket only).
    pub api_listen: Option<(SocketAddr, super::tls::TlsConfig)>,
    pub cri_socket: Option<PathBuf>,
    pub use_cri: bool,
    pub state_dir: PathBuf,
    pub series_retention: Duration,
    pub max_series: usize,
    pub ring_buffer_size: u32,
    pub node_name: String,
    pub journal_max_bytes: u64,
    pub records_memory_bytes: u64,
    pub netns: Option<PathBuf>,
    pub rules_timeout: Duration,
    /// TLS and authentication of the metrics listener (None: plain HTTP).
    pub metrics_tls: Option<super::tls::TlsConfig>,
}

#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {detail}")]
    File { path: String, detail: String },
    #[error("invalid setting {key}: {detail}")]
    Invalid { key: &'static str, detail: String },
}

impl AgentConfig {
    pub fn resolve(args: &AgentArgs) -> Result<AgentConfig, ConfigError> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let listen = args
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| "0.0.0.0:9811".into());
        let listen: SocketAddr = listen.parse().map_err(|_| ConfigError::Invalid {
            key: "listen",
            detail: format!("{listen:?} is not an address:port such as 0.0.0.0:9811"),
        })?;
        let series_retention = match (args.series_retention, file.series_retention) {
            (Some(d), _) => d,
            (None, Some(s)) => parse_duration(&s).map_err(|detail| ConfigError::Invalid {
                key: "series-retention",
                detail,
            })?,
            (None, None) => Duration::from_secs(600),
        };
        let max_series = args.max_series.or(file.max_series).unwrap_or(50_000);
        if max_series == 0 {
            return Err(ConfigError::Invalid {
                key: "max-series",
                detail: "must be at least 1".into(),
            });
        }
        let ring_buffer_size = args
            .ring_buffer_size
            .or(file.ring_buffer_size)
            .unwrap_or_else(crate::probes::default_ring_buffer_bytes);
        if ring_buffer_size < 4096 || !ring_buffer_size.is_power_of_two() {
            return Err(ConfigError::Invalid {
                key: "ring-buffer-size",
                detail: format!("{ring_buffer_size} must be a power of two of at least 4096"),
            });
        }
        let journal_max_bytes = at_least_64k(
            "journal-max-bytes",
            args.journal_max_bytes
                .or(file.journal_max_bytes)
                .unwrap_or(16 << 20),
        )?;
        let records_memory_bytes = at_least_64k(
            "records-memory-bytes",
            args.records_memory_bytes
                .or(file.records_memory_bytes)
                .unwrap_or(crate::forensics::store::StoreLimits::default().bytes as u64),
        )?;
        let rules_timeout = match (args.rules_timeout, file.rules_timeout) {
            (Some(d), _) => d,
            (None, Some(s)) => parse_duration(&s).map_err(|detail| ConfigError::Invalid {
                key: "rules-timeout",
                detail,
            })?,
            (None, None) => Duration::from_secs(10),
        };
        if rules_timeout < Duration::from_millis(100) {
            return Err(ConfigError::Invalid {
                key: "rules-timeout",
                detail: format!("{rules_timeout:?} is too short: use 100ms or more"),
            });
        }
        let metrics_tls = super::tls::TlsConfig::resolve(
            super::tls::Listener::Metrics,
            args.metrics_tls_cert.clone().or(file.metrics_tls_cert),
            args.metrics_tls_key.clone().or(file.metrics_tls_key),
            args.metrics_client_ca.clone().or(file.metrics_client_ca),
            args.metrics_token_file.clone().or(file.metrics_token_file),
        )
        .map_err(|detail| ConfigError::Invalid {
            key: "metrics-tls",
            detail,
        })?;
        let api_socket = args
            .api_socket
            .clone()
            .or(file.api_socket)
            .unwrap_or_else(|| DEFAULT_API_SOCKET.into());
        check_socket_path(&api_socket).map_err(|detail| ConfigError::Invalid {
            key: "api-socket",
            detail,
        })?;
        let api_tls = super::tls::TlsConfig::resolve(
            super::tls::Listener::Api,
            args.api_tls_cert.clone().or(file.api_tls_cert),
            args.api_tls_key.clone().or(file.api_tls_key),
            args.api_client_ca.clone().or(file.api_client_ca),
            args.api_token_file.clone().or(file.api_token_file),
        )
        .map_err(|detail| ConfigError::Invalid {
            key: "api-listen",
            detail,
        })?;
        let api_listen = match (args.api_listen.clone().or(file.api_listen), api_tls) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "api-listen",
                    detail: "--api-tls-cert, --api-tls-key, --api-client-ca and --api-token-file apply to --api-listen, which is not set".into(),
                });
            }
            (Some(addr), tls) => {
                let parsed: SocketAddr = addr.parse().map_err(|_| ConfigError::Invalid {
                    key: "api-listen",
                    detail: format!("{addr:?} is not an address:port such as 0.0.0.0:9812"),
                })?;
                let Some(tls) = tls else {
                    return Err(ConfigError::Invalid {
                        key: "api-listen",
                        detail: format!(
                            "{addr} would serve every pod's events and terminations to anyone who reaches it, so it needs authentication: give --api-token-file or --api-client-ca, with --api-tls-cert and --api-tls-key"
                        ),
                    });
                };
                if parsed == listen {
                    return Err(ConfigError::Invalid {
                        key: "api-listen",
                        detail: format!(
                            "{addr} is the metrics listener's address (--listen): give the API a port of its own"
                        ),
                    });
                }
                Some((parsed, tls))
            }
        };
        Ok(AgentConfig {
            api_socket,
            api_listen,
            rules_timeout,
            metrics_tls,
            journal_max_bytes,
            records_memory_bytes,
            listen,
            cri_socket: args.cri_socket.clone().or(file.cri_socket),
            use_cri: !(args.no_cri || file.no_cri.unwrap_or(false)),
            state_dir: args
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| "/var/lib/podscope".into()),
            series_retention,
            max_series,
            ring_buffer_size,
            node_name: args
                .node_name
                .clone()
                .or(file.node_name)
                .unwrap_or_else(hostname),
            netns: args.netns.clone().or(file.netns),
        })
    }
}

/// Where the node-wide API's socket is unless `--api-socket` says
/// otherwise; `podscope why` and `doctor` look there without flags.
pub const DEFAULT_API_SOCKET: &str = "/run/podscope/api.sock";

/// The longest path a unix socket address holds (sun_path, with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// An absolute path that fits a unix socket address.
/// A byte budget (the journal's, the records' in memory): 64 KiB at least,
/// below which one large record would not fit.
fn at_least_64k(key: &'static str, bytes: u64) -> Result<u64, ConfigError> {
    if bytes < 64 << 10 {
        return Err(ConfigError::Invalid {
            key,
            detail: format!("{bytes} is too small: at least 65536"),
        });
    }
    Ok(bytes)
}

fn check_socket_path(p: &Path) -> Result<(), String> {
    if !p.is_absolute() {
        return Err(format!("{} must be an absolute path", p.display()));
    }
    if p.file_name().is_none() {
        return Err(format!("{} names no file", p.display()));
    }
    let len = p.as_os_str().len();
    let dir = p.parent().map_or(0, |d| d.as_os_str().len());
    if len > MAX_SOCKET_PATH || dir + super::socket::TEMP_NAME_LEN > MAX_SOCKET_PATH {
        return Err(format!(
            "{} is too long for a unix socket: at most {MAX_SOCKET_PATH} bytes, {} of them for the directory",
            p.display(),
            MAX_SOCKET_PATH - super::socket::TEMP_NAME_LEN
        ));
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        detail: e.message().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_and_flags_in_that_order() {
        let c = AgentConfig::resolve(&AgentArgs::default()).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9811".parse().unwrap());
        assert_eq!(c.series_retention, Duration::from_secs(600));
        let dir = std::env::temp_dir().join(format!("podscope-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("agent.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:1234\"\nseries-retention = \"2m\"\nmax-series = 10\n",
        )
        .unwrap();
        let args = AgentArgs {
            config: Some(f.clone()),
            max_series: Some(20),
            ..Default::default()
        };
        let c = AgentConfig::resolve(&args).unwrap();
        assert_eq!(c.listen, "127.0.0.1:1234".parse().unwrap());
        assert_eq!(c.series_retention, Duration::from_secs(120));
        assert_eq!(c.max_series, 20, "the flag wins over the file");
        std::fs::write(&f, "lisen = \"x\"\n").unwrap();
        let err = AgentConfig::resolve(&args).unwrap_err().to_string();
        assert!(
            err.contains("unknown field") && err.contains("lisen"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn invalid_settings_are_one_sentence() {
        let bad = AgentArgs {
            listen: Some("9811".into()),
            ..Default::default()
        };
        let err = AgentConfig::resolve(&bad).unwrap_err().to_string();
        assert!(err.contains("listen") && !err.contains('\n'), "{err}");
        let bad = AgentArgs {
            ring_buffer_size: Some(5000),
            ..Default::default()
        };
        assert!(AgentConfig::resolve(&bad).is_err());
        let bad = AgentArgs {
            records_memory_bytes: Some(1000),
            ..Default::default()
        };
        let err = AgentConfig::resolve(&bad).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid setting records-memory-bytes: 1000 is too small: at least 65536"
        );
        let bad = AgentArgs {
            config: Some("/nonexistent/podscope.toml".into()),
            ..Default::default()
        };
        assert!(matches!(
            AgentConfig::resolve(&bad),
            Err(ConfigError::File { .. })
        ));
    }

    #[test]
    fn the_api_is_on_its_socket_and_on_tcp_only_with_tls_and_credentials() {
        let c = AgentConfig::resolve(&AgentArgs::default()).unwrap();
        assert_eq!(c.api_socket, PathBuf::from(DEFAULT_API_SOCKET));
        assert_eq!(c.api_listen, None, "no TCP for the API by default");
        let err = |args: AgentArgs| AgentConfig::resolve(&args).unwrap_err().to_string();
        let listen = Some("0.0.0.0:9812".to_string());
        // No authentication at all: refused, in one sentence.
        let e = err(AgentArgs {
            api_listen: listen.clone(),
            ..Default::default()
        });
        assert!(
            e.contains("needs authentication")
                && e.contains("--api-token-file")
                && !e.contains('\n'),
            "{e}"
        );
        // A token without TLS: never over plain HTTP.
        let e = err(AgentArgs {
            api_listen: listen.clone(),
            api_token_file: Some("t".into()),
            ..Default::default()
        });
        assert!(e.contains("plain HTTP"), "{e}");
        // TLS without a token or CA.
        let e = err(AgentArgs {
            api_listen: listen.clone(),
            api_tls_cert: Some("c".into()),
            api_tls_key: Some("k".into()),
            ..Default::default()
        });
        assert!(e.contains("--api-client-ca or --api-token-file"), "{e}");
        // API settings without --api-listen say so.
        let e = err(AgentArgs {
            api_token_file: Some("t".into()),
            api_tls_cert: Some("c".into()),
            api_tls_key: Some("k".into()),
            ..Default::default()
        });
        assert!(e.contains("which is not set"), "{e}");
        // The metrics listener's address is taken.
        let e = err(AgentArgs {
            api_listen: Some("0.0.0.0:9811".into()),
            api_token_file: Some("t".into()),
            api_tls_cert: Some("c".into()),
            api_tls_key: Some("k".into()),
            ..Default::default()
        });
        assert!(e.contains("port of its own"), "{e}");
        let ok = AgentConfig::resolve(&AgentArgs {
            api_listen: listen,
            api_token_file: Some("t".into()),
            api_tls_cert: Some("c".into()),
            api_tls_key: Some("k".into()),
            ..Default::default()
        })
        .unwrap();
        let (addr, tls) = ok.api_listen.unwrap();
        assert_eq!(addr, "0.0.0.0:9812".parse().unwrap());
        assert_eq!(tls.token_file, Some(PathBuf::from("t")));
        // Socket paths a unix socket cannot have.
        for bad in ["relative.sock", &format!("/{}", "x".repeat(120))] {
            let e = err(AgentArgs {
                api_socket: Some(bad.into()),
                ..Default::default()
            });
            assert!(e.starts_with("invalid setting api-socket"), "{e}");
        }
    }
}
