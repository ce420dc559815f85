//! The node's network namespace: containerd, its CNI bridge and every pod's
//! veth live behind it, so the machine's own interfaces and firewall are
//! never touched (docs/architecture.md, "The test node").

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{
    error::{Error, IoContext, Result, run},
    paths::NETNS,
};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// `program` run inside the node's namespace.
pub fn in_node(program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", NETNS, program]);
    c
}

/// Runs `program args` in the node's namespace with `script` on its stdin
/// (`iptables-restore`, `nft -f -`); its stderr is the error.
pub fn feed_in_node(program: &str, args: &[&str], script: &str) -> Result<()> {
    let what = format!("{program} {}", args.join(" "));
    let mut child = in_node(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("cannot run {program} in the node's namespace (Debian's package: `cargo xtask setup`)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .ctx(|| format!("cannot write to {program}"))?;
    }
    let out = child
        .wait_with_output()
        .ctx(|| format!("cannot wait for {program}"))?;
    if !out.status.success() {
        return Err(Error::Command {
            what,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

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
