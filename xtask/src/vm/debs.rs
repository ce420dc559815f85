//! Debian packages the guests are made of (kernels, busybox for each
//! architecture): downloaded once with `apt-get download`, unpacked with
//! `dpkg -x`, and only the files the matrix uses kept in the cache.
//! Foreign-architecture packages (`busybox-static:arm64`) need the
//! architecture added to dpkg, which `cargo xtask setup` does.

use std::{
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context, Result, bail};
use xtask::toolchain::cache_dir;

/// Where unpacked packages' kept files live.
pub fn debs_dir() -> PathBuf {
    cache_dir().join("debs")
}

/// Makes `dest` hold what `harvest` copies out of `package`'s unpacked tree,
/// unless `done(dest)` says it already does. `harvest(tree, out)` writes into
/// a scratch directory that replaces `dest` only once complete, so an
/// interrupted fetch never leaves half a kernel behind.
pub fn fetch(
    package: &str,
    dest: &Path,
    done: impl Fn(&Path) -> bool,
    harvest: impl FnOnce(&Path, &Path) -> Result<()>,
) -> Result<()> {
    if done(dest) {
        return Ok(());
    }
    let parent = dest.parent().context("a cache directory has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    // One fetch of a destination at a time (two kernels of one architecture
    // share its busybox; two commands may share the cache): the second
    // waits, then finds it done.
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("fetch");
    let lock = fs::File::create(parent.join(format!(".{name}.lock")))
        .with_context(|| format!("cannot create a lock file in {}", parent.display()))?;
    // SAFETY: flock on a file descriptor we own, held until `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "cannot lock {}: {}",
            dest.display(),
            std::io::Error::last_os_error()
        );
    }
    if done(dest) {
        return Ok(());
    }
    eprintln!("xtask: fetching {package}");
    // Kernels of the matrix are fetched side by side (one thread each) into
    // the same parent: each fetch needs a scratch directory of its own, or
    // the first to finish removes the tree another is still unpacking.
    static FETCHES: AtomicUsize = AtomicUsize::new(0);
    let scratch = parent.join(format!(
        ".download-{}-{}",
        std::process::id(),
        FETCHES.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let r = unpack(package, &scratch).and_then(|tree| {
        let out = scratch.join("out");
        fs::create_dir_all(&out)?;
        harvest(&tree, &out)?;
        let _ = fs::remove_dir_all(dest);
        fs::rename(&out, dest).with_context(|| format!("cannot create {}", dest.display()))
    });
    let _ = fs::remove_dir_all(&scratch);
    r
}

/// Downloads `package` into `scratch` and unpacks it; returns the tree.
fn unpack(package: &str, scratch: &Path) -> Result<PathBuf> {
    let out = Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(scratch)
        .output()
        .context("cannot run apt-get (is this Debian?)")?;
    if !out.status.success() {
        bail!(
            "`apt-get download {package}` failed: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            if package.contains(':') {
                " (a foreign architecture needs `dpkg --add-architecture` and `apt-get update`: `cargo xtask setup` does both)"
            } else {
                ""
            }
        );
    }
    let deb = fs::read_dir(scratch)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("`apt-get download {package}` left no .deb"))?;
    let tree = scratch.join("tree");
    let out = Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&tree)
        .output()
        .context("cannot run dpkg")?;
    if !out.status.success() {
        bail!(
            "`dpkg -x {}` failed: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(tree)
}

/// Debian's static busybox for `arch` (the guests' whole userspace besides
/// the test binary), fetched as `busybox-static:<arch>`: the host's own
/// /bin/busybox is only right for the host's architecture.
pub fn busybox(debian_arch: &str) -> Result<PathBuf> {
    let dest = debs_dir().join(format!("busybox-static_{debian_arch}"));
    fetch(
        &format!("busybox-static:{debian_arch}"),
        &dest,
        |d| d.join("busybox").is_file(),
        |tree, out| {
            fs::copy(tree.join("bin/busybox"), out.join("busybox"))
                .context("busybox-static has no /bin/busybox")?;
            Ok(())
        },
    )?;
    Ok(dest.join("busybox"))
}
