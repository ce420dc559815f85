//! Rebuild the eBPF object when bpf-linker changes (a new nightly LLVM means a
//! new linker build, see `cargo xtask setup`).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    println!("cargo:rerun-if-env-changed=PATH");
}
