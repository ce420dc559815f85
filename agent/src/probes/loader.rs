//! An aya loader that does not parse the kernel's BTF.
//!
//! aya 0.14's `EbpfLoader::new()` parses `/sys/kernel/btf/vmlinux` at once,
//! for CO-RE relocations: about 25 MiB at its peak on a 6.x kernel, which
//! would set the process's memory high-water mark. podscope's object has no
//! CO-RE relocations (Rust eBPF has none; podscope reads the offsets its
//! programs need from BTF itself, in `kernel::btf`, and sets them as
//! load-time globals), so that parse buys nothing. aya reads a fixed path
//! and has no way to skip it, so the loader is made on a short-lived thread
//! whose root directory is a place where that path does not exist: the
//! thread first takes a private copy of its filesystem view
//! (`unshare(CLONE_FS)`), so the `chroot` is its own and ends with it; the
//! rest of the process never sees it.
//!
//! Where that is refused (no CAP_SYS_CHROOT, a seccomp profile), the loader
//! is made as aya makes it and start-up simply peaks higher; the debug log
//! says so.

use std::{ffi::CStr, io, path::Path};

use aya::EbpfLoader;

/// A directory that exists wherever /proc does and holds only numbered
/// entries, so `sys/kernel/btf/vmlinux` cannot resolve under it.
const EMPTY_ROOT: &CStr = c"/proc/self/fdinfo";
/// The path aya 0.14 reads in `EbpfLoader::new()`.
const AYA_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// A loader with no target BTF, made without parsing the kernel's.
pub(super) fn without_kernel_btf<'a>() -> EbpfLoader<'a> {
    let made = std::thread::scope(|s| {
        s.spawn(|| hide_kernel_btf().map(|()| EbpfLoader::new()))
            .join()
    });
    let mut loader = match made {
        Ok(Ok(loader)) => loader,
        Ok(Err(why)) => {
            tracing::debug!(
                "aya parses the kernel's BTF at load ({why}): start-up memory peaks about 25 MiB higher"
            );
            EbpfLoader::new()
        }
        Err(_) => EbpfLoader::new(),
    };
    loader.btf(None);
    loader
}

/// Moves this thread (only) to [`EMPTY_ROOT`].
fn hide_kernel_btf() -> Result<(), String> {
    // SAFETY: unshare(CLONE_FS) changes only the calling thread's own
    // filesystem context (root, cwd, umask), which no Rust code relies on.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(format!("unshare(CLONE_FS): {}", io::Error::last_os_error()));
    }
    // SAFETY: a NUL-terminated path; affects this thread's root only, above.
    if unsafe { libc::chroot(EMPTY_ROOT.as_ptr()) } != 0 {
        return Err(format!(
            "chroot {}: {}",
            EMPTY_ROOT.to_string_lossy(),
            io::Error::last_os_error()
        ));
    }
    if Path::new(AYA_BTF_PATH).exists() {
        return Err(format!("{AYA_BTF_PATH} is still visible"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chroot is the thread's own: the process still sees its root.
    #[test]
    fn hiding_is_confined_to_the_loader_thread() {
        let root_before = std::fs::read_link("/proc/self/root").unwrap();
        let outcome = std::thread::spawn(|| {
            let r = hide_kernel_btf();
            (r, Path::new("/proc").exists())
        })
        .join()
        .unwrap();
        // As root (CI, the agent) the chroot must work, and hides
        // everything from the thread, /proc too.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(outcome.0, Ok(()));
            assert!(!outcome.1, "the thread still sees /proc after its chroot");
        }
        assert_eq!(std::fs::read_link("/proc/self/root").unwrap(), root_before);
        assert!(Path::new("/proc/self").exists());
    }
}
