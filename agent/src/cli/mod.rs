//! The `podscope` command line: one module per subcommand.

pub mod client;
pub mod doctor;
pub mod escape;
mod rules_read;
mod top;
mod trace;
pub mod why;

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "podscope",
    version,
    about = "Explains why pods die, stall or lose packets, from eBPF probes on the node"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "PODSCOPE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax), e.g. "debug" or "podscope=trace".
    #[arg(long, global = true, default_value = "info", env = "PODSCOPE_LOG")]
    pub log: String,
    /// The running kernel's BTF, for kernels without /sys/kernel/btf/vmlinux
    /// (a file from BTFHub, or made with `pahole --btf_encode_detached`).
    #[arg(long, global = true, value_name = "PATH", env = "PODSCOPE_BTF")]
    pub btf: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The node agent (the DaemonSet's daemon): metrics on --listen, the
    /// node-wide API and event stream on its unix socket (--api-socket).
    Agent(Box<crate::daemon::config::AgentArgs>),
    /// Live view of one event family, straight from the kernel (no daemon needed).
    Trace(trace::TraceArgs),
    /// Why a pod's containers ended: reason, sender, OOM, grace period (asks
    /// the local agent over its unix socket: run it as root on the node).
    Why(why::WhyArgs),
    /// What this kernel and node support, and what that means for podscope.
    Doctor(doctor::DoctorArgs),
    /// Containers sorted by CPU throttling, refreshed like top (no daemon needed).
    Top(top::TopArgs),
    /// One read of kube-proxy's rules here, timed (for the benchmarks).
    #[command(hide = true)]
    RulesRead,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table for people.
    Table,
    /// JSON: one object per line for streams, one object for reports.
    Json,
}

/// Parses "10s", "1m30s", "500ms", or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("{s} is not a duration"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s} is not a duration ({e}); try 10s, 2m or 500ms"))
}

fn init_logging(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .init(),
    }
}

/// Entry point of the binary: parse, run, and turn any error into one line
/// on stderr and exit status 1 (2 for usage errors, which clap reports).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    if let Some(path) = &cli.btf {
        crate::kernel::btf::set_kernel_btf_path(path.clone());
    }
    let result = match cli.command {
        Command::Agent(args) => crate::daemon::run(*args),
        Command::Trace(args) => trace::run(args),
        Command::Why(args) => why::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Top(args) => top::run(args),
        Command::RulesRead => rules_read::run(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("podscope: {}", crate::probes::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_the_usual_forms() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
