//! Builds `agent-ebpf` for the BPF target with the nightly toolchain and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.

use std::{env, path::PathBuf, process::exit};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let ebpf_dir = manifest_dir.join("../agent-ebpf");
    let common_dir = manifest_dir.join("../agent-common/src");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    println!("cargo:rerun-if-env-changed=PODSCOPE_CACHE");

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if !skip {
        // Put the project's own bpf-linker (keyed by the nightly) first on PATH
        // for the nested eBPF build; a bpf-linker already on PATH also works.
        match xtask::toolchain::installed_bpf_linker() {
            Ok(linker) => {
                println!("cargo:rerun-if-changed={}", linker.display());
                let dir = linker.parent().map(PathBuf::from).unwrap_or_default();
                let path = env::var_os("PATH").unwrap_or_default();
                let mut paths = vec![dir];
                paths.extend(env::split_paths(&path));
                // SAFETY: build scripts are single-threaded here.
                unsafe { env::set_var("PATH", env::join_paths(paths).unwrap_or(path)) };
            }
            Err(msg) if which_bpf_linker().is_none() => {
                eprintln!("error: cannot build podscope's eBPF programs: {msg}");
                exit(1);
            }
            Err(_) => {}
        }
    }

    let ebpf_dir = ebpf_dir.to_string_lossy().into_owned();
    let package = aya_build::Package {
        name: "agent-ebpf",
        root_dir: &ebpf_dir,
        ..Default::default()
    };
    // One eBPF build per architecture for the whole target directory: the
    // object depends on the BPF sources and the target's architecture only,
    // yet every build context (clippy, release, the kernel matrix's static
    // binaries) has an OUT_DIR of its own, and a nested build with
    // build-std costs about 20 s. aya-build builds under whatever OUT_DIR
    // says, so it is pointed at a directory shared per architecture, where
    // cargo's own fingerprints decide what to rebuild, and the object is
    // copied to the real OUT_DIR.
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let shared = shared_ebpf_dir(&out_dir);
    if let Some(dir) = &shared {
        // SAFETY: build scripts are single-threaded here.
        unsafe { env::set_var("OUT_DIR", dir) };
    }
    let built = aya_build::build_ebpf([package], aya_build::Toolchain::Nightly);
    if let Some(dir) = &shared {
        // SAFETY: as above.
        unsafe { env::set_var("OUT_DIR", &out_dir) };
        if built.is_ok()
            && !skip
            && let Err(e) = std::fs::copy(dir.join("agent-ebpf"), out_dir.join("agent-ebpf"))
        {
            eprintln!(
                "error: cannot copy the eBPF object from {}: {e}",
                dir.display()
            );
            exit(1);
        }
    }
    if let Err(e) = built {
        eprintln!(
            "error: building podscope's eBPF programs failed (the compiler's messages are above, as warnings): {e:#}\n\
             hint: `cargo xtask setup` installs what the eBPF build needs (nightly rust-src, bpf-linker)"
        );
        exit(1);
    }
    if skip {
        // aya-build skipped: leave an empty object so the agent still compiles
        // (clippy, docs); loading it reports that it was built without programs.
        let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default()).join("agent-ebpf");
        if !out.exists() {
            let _ = std::fs::write(out, []);
        }
    }
}

/// `<target dir>/ebpf/<arch>`: the target directory is the ancestor of
/// OUT_DIR that cargo tagged with CACHEDIR.TAG. Cargo also tags
/// `<target dir>/<triple>` for a `--target` build (the kernel matrix's musl
/// binaries), which would give those builds an eBPF build of their own: the
/// outermost of the tagged directories in a row is the one every build
/// shares. None (build in OUT_DIR, as aya-build does by default) when it
/// cannot be found.
fn shared_ebpf_dir(out_dir: &std::path::Path) -> Option<PathBuf> {
    let tagged = |d: &&std::path::Path| d.join("CACHEDIR.TAG").is_file();
    let target = out_dir
        .ancestors()
        .skip_while(|d| !tagged(d))
        .take_while(tagged)
        .last()?;
    let arch = env::var("CARGO_CFG_TARGET_ARCH").ok()?;
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").ok()?;
    let dir = target.join("ebpf").join(format!("{arch}-{endian}"));
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

fn which_bpf_linker() -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join("bpf-linker"))
        .find(|p| xtask::toolchain::is_executable(p))
}
