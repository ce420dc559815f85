//! What podscope needs to know about the running kernel: its BTF, its clocks,
//! the caller's privileges, the cgroup layout, and raw `bpf(2)` for what aya
//! has no API for.

pub mod bpf_sys;
pub mod btf;
pub mod cgroups;
pub mod clock;
pub mod cpu_stat;
pub mod privilege;
pub mod tracefs;

/// Hands memory freed after start-up (BTF parsing is by far the largest
/// allocation) back to the system, so the resident size reflects what the
/// tracer really keeps.
pub fn release_freed_memory() {
    // glibc only: musl (the shipped static binary, the kernel-test binary)
    // has no malloc_trim and returns freed pages to the system by itself.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0)
    };
}

/// This process's resident memory now and at its peak (VmRSS, VmHWM), KiB.
pub fn resident_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! BTF recorded from other kernels (see fixtures/README.md).
    use std::io::Read;

    use super::btf::Btf;

    fn gunzip(path: &str) -> Vec<u8> {
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut out = vec![];
        flate2::read::GzDecoder::new(file)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// Debian's linux-image-6.1.0-47-cloud-amd64 (6.1.170), `.BTF` of its vmlinux.
    pub fn debian_6_1_btf() -> Btf {
        Btf::parse(debian_6_1_btf_bytes()).unwrap()
    }

    pub fn debian_6_1_btf_bytes() -> Vec<u8> {
        gunzip(DEBIAN_6_1_BTF)
    }

    pub const DEBIAN_6_1_BTF: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/btf-6.1.0-47-cloud-amd64.gz"
    );
}
