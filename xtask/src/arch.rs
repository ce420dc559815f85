//! The CPU architectures podscope ships for, and each one's name in every
//! tool that needs it: Rust's target, Debian's architecture (kernel and
//! busybox packages), Docker's platform, qemu's system emulator.

/// An architecture podscope is built and tested for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// Every architecture `cargo xtask dist` builds, the host's first.
    pub const ALL: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

    /// The static (musl) Rust target; its linker for aarch64 is set in
    /// .cargo/config.toml (rust-lld, shipped with the toolchain).
    pub fn musl_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// Debian's (and Docker's `TARGETARCH`) name.
    /// The C compiler for this target's C code (ring, rustls' crypto):
    /// `CC_<target>` and the command, from the set-up's Debian packages.
    pub fn c_compiler(self) -> (&'static str, &'static str) {
        match self {
            Arch::X86_64 => ("CC_x86_64_unknown_linux_musl", "musl-gcc"),
            Arch::Aarch64 => ("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc"),
        }
    }

    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The qemu system emulator and the Debian package that has it.
    pub fn qemu(self) -> (&'static str, &'static str) {
        match self {
            Arch::X86_64 => ("qemu-system-x86_64", "qemu-system-x86"),
            Arch::Aarch64 => ("qemu-system-aarch64", "qemu-system-arm"),
        }
    }

    /// The machine arguments under TCG. x86_64: `-cpu max` (every feature
    /// the emulator has; the default machine). aarch64: the `virt` board
    /// with a Cortex-A57, as measured: `-cpu max` would also emulate pointer
    /// authentication and SVE, which TCG runs much more slowly.
    pub fn machine(self) -> &'static [&'static str] {
        match self {
            Arch::X86_64 => &["-cpu", "max"],
            Arch::Aarch64 => &["-M", "virt", "-cpu", "cortex-a57"],
        }
    }

    /// The serial console's device name on the kernel command line.
    pub fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// The architecture this xtask runs on.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_agree_between_tools() {
        for a in Arch::ALL {
            let rust = a.musl_target().split('-').next().unwrap();
            assert!(a.qemu().0.ends_with(rust), "{a:?}");
            assert!(a.musl_target().ends_with("-linux-musl"));
        }
        assert_eq!(Arch::Aarch64.debian(), "arm64");
    }
}
