//! Signal numbers and names (x86_64/arm64 Linux numbering).

use std::borrow::Cow;

const NAMES: [&str; 32] = [
    "",
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGILL",
    "SIGTRAP",
    "SIGABRT",
    "SIGBUS",
    "SIGFPE",
    "SIGKILL",
    "SIGUSR1",
    "SIGSEGV",
    "SIGUSR2",
    "SIGPIPE",
    "SIGALRM",
    "SIGTERM",
    "SIGSTKFLT",
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGXCPU",
    "SIGXFSZ",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGIO",
    "SIGPWR",
    "SIGSYS",
];

/// The conventional name of a signal: "SIGKILL", "SIGRTMIN+3", or "SIG70"
/// for numbers outside the table. No allocation for the common ones: this
/// runs once per decoded event.
pub fn name(sig: u32) -> Cow<'static, str> {
    match sig {
        1..=31 => Cow::Borrowed(NAMES[sig as usize]),
        34 => Cow::Borrowed("SIGRTMIN"),
        35..=64 => Cow::Owned(format!("SIGRTMIN+{}", sig - 34)),
        _ => Cow::Owned(format!("SIG{sig}")),
    }
}

/// The number for a name, with or without the "SIG" prefix, or a number.
pub fn number(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    NAMES.iter().position(|n| *n == full).map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        assert_eq!(name(9), "SIGKILL");
        assert_eq!(name(15), "SIGTERM");
        assert_eq!(name(11), "SIGSEGV");
        assert_eq!(name(34), "SIGRTMIN");
        assert_eq!(name(36), "SIGRTMIN+2");
        assert_eq!(name(0), "SIG0");
        for sig in 1..=31 {
            assert_eq!(number(&name(sig)), Some(sig));
        }
        assert_eq!(number("term"), Some(15));
        assert_eq!(number("9"), Some(9));
        assert_eq!(number("SIGNOPE"), None);
    }
}
