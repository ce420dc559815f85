//! Can this process load eBPF programs?

use std::fs;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capabilities that matter to podscope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Privileges {
    pub root: bool,
    pub cap_bpf: bool,
    pub cap_perfmon: bool,
    pub cap_sys_admin: bool,
}

impl Privileges {
    pub fn current() -> Privileges {
        let eff = fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| parse_cap_eff(&s))
            .unwrap_or(0);
        let has = |cap: u32| eff & (1u64 << cap) != 0;
        Privileges {
            // SAFETY: geteuid has no preconditions.
            root: unsafe { libc::geteuid() } == 0,
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_sys_admin: has(CAP_SYS_ADMIN),
        }
    }

    /// Tracing programs need CAP_BPF with CAP_PERFMON, or CAP_SYS_ADMIN.
    pub fn can_trace(&self) -> bool {
        (self.cap_bpf && self.cap_perfmon) || self.cap_sys_admin
    }

    /// One sentence for a person who ran podscope without enough privilege.
    pub fn require_tracing(&self) -> Result<(), String> {
        if self.can_trace() {
            return Ok(());
        }
        Err(
            "podscope needs root (or CAP_BPF and CAP_PERFMON) to load its eBPF programs: run it with sudo"
                .to_string(),
        )
    }

    pub fn describe(&self) -> String {
        let caps: Vec<&str> = [
            (self.cap_bpf, "CAP_BPF"),
            (self.cap_perfmon, "CAP_PERFMON"),
            (self.cap_sys_admin, "CAP_SYS_ADMIN"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        format!(
            "{} with {}",
            if self.root { "root" } else { "not root" },
            if caps.is_empty() {
                "none of CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN".to_string()
            } else {
                caps.join(", ")
            }
        )
    }
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001c000200000\n";
        let eff = parse_cap_eff(status).unwrap();
        assert_ne!(eff & (1 << CAP_BPF), 0);
        assert_ne!(eff & (1 << CAP_PERFMON), 0);
        assert_ne!(eff & (1 << CAP_SYS_ADMIN), 0);
        assert_eq!(parse_cap_eff("nothing"), None);
    }

    #[test]
    fn unprivileged_gets_one_sentence() {
        let p = Privileges {
            root: false,
            cap_bpf: false,
            cap_perfmon: false,
            cap_sys_admin: false,
        };
        let msg = p.require_tracing().unwrap_err();
        assert!(msg.contains("needs root") && !msg.contains('\n'), "{msg}");
        let bpf_only = Privileges {
            cap_bpf: true,
            cap_perfmon: true,
            ..p
        };
        assert!(bpf_only.require_tracing().is_ok());
    }
}
