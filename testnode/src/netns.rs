//! The node's network namespace: containerd, its CNI bridge and every pod's
//! veth live behind it, so the machine's own interfaces and firewall are
//! never touched (docs/architecture.md, "The test node").

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    error::{IoContext, Result, run},
    paths::NETNS,
};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
const NSFS_MAGIC: i64 = 0x6e73_6673;

pub fn path() -> PathBuf {
    Path::new(NETNS_DIR).join(NETNS)
}

/// Whether `p` is a mounted namespace file (an unmounted leftover is a plain empty file).
pub fn is_nsfs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC }
}

/// Creates the namespace with loopback up; true when it had to be created.
pub fn ensure() -> Result<bool> {
    let p = path();
    if is_nsfs(&p) {
        return Ok(false);
    }
    if p.exists() {
        // A leftover of an interrupted run: remove it so `ip` can start afresh.
        let _ = run(Command::new("ip").args(["netns", "delete", NETNS]));
        let _ = std::fs::remove_file(&p);
    }
    run(Command::new("ip").args(["netns", "add", NETNS]))?;
    // CRI's streaming server listens on 127.0.0.1 inside the namespace.
    run(Command::new("ip").args(["-n", NETNS, "link", "set", "lo", "up"]))?;
    Ok(true)
}

/// Deletes the namespace (and with it the bridge and any veth left in it).
pub fn delete() -> Result<bool> {
    let p = path();
    if !p.exists() {
        return Ok(false);
    }
    if is_nsfs(&p) {
        run(Command::new("ip").args(["netns", "delete", NETNS]))?;
    }
    if p.exists() {
        std::fs::remove_file(&p).ctx(|| format!("cannot remove {}", p.display()))?;
    }
    Ok(true)
}

/// The namespace's inode, to recognise processes that live in it.
pub fn inode() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path()).ok().map(|m| m.ino())
}

/// The network namespace inode of a process.
pub fn inode_of(pid: i32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}
