//! The guests' whole userspace: an uncompressed initramfs (newc cpio,
//! written here, so no cpio tool is needed) with busybox and the static test
//! binary of the guest's architecture, the kernel's netfilter modules, and an
//! /init that loads them, mounts what the tests need, runs them with the
//! arguments the kernel command line gives after `--`, and powers off.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

/// PID 1. tracefs is mounted because `podscope doctor` and the plain
/// tracepoint hook find tracepoints there; cgroup2 because events carry
/// cgroup v2 ids. Whatever happens, the guest powers off (and should init
/// die instead, `panic=-1` with qemu's `-no-reboot` ends the VM too).
const INIT: &str = "#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# A module that does not load is named here; the scenario needing it fails
# with its own message.
while read m; do
  insmod /lib/modules/$m || echo PODSCOPE-MODULE-FAILED $m
done < /lib/modules/order
echo PODSCOPE-BOOTED
/podscope-kernel-tests \"$@\"
echo PODSCOPE-EXIT $?
poweroff -f
";

/// The busybox applets the init script and the scenarios call.
const APPLETS: &[&str] = &["sh", "sleep", "mount", "poweroff", "echo", "insmod"];

/// Writes the initramfs to `out`: `busybox` and `test_bin` must be of the
/// guest's architecture, `modules` (plain .ko files) of its kernel, in the
/// order to load them.
pub fn build(busybox: &Path, test_bin: &Path, modules: &[PathBuf], out: &Path) -> Result<()> {
    let read = |p: &Path| fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let busybox = read(busybox)?;
    let tests = read(test_bin)?;
    let mut w = Writer::default();
    for dir in ["bin", "dev", "proc", "sys", "root", "lib", "lib/modules"] {
        w.entry(dir, 0o040755, &[], (0, 0));
    }
    let mut order = String::new();
    for m in modules {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: no file name", m.display()))?;
        w.entry(&format!("lib/modules/{name}"), 0o100644, &read(m)?, (0, 0));
        order.push_str(name);
        order.push('\n');
    }
    w.entry("lib/modules/order", 0o100644, order.as_bytes(), (0, 0));
    w.entry("tmp", 0o041777, &[], (0, 0));
    // The kernel opens /dev/console for PID 1's output before /init can
    // mount devtmpfs: without this node, nothing would reach the serial port.
    w.entry("dev/console", 0o020600, &[], (5, 1));
    w.entry("bin/busybox", 0o100755, &busybox, (0, 0));
    for applet in APPLETS {
        w.entry(&format!("bin/{applet}"), 0o120777, b"busybox", (0, 0));
    }
    w.entry("podscope-kernel-tests", 0o100755, &tests, (0, 0));
    w.entry("init", 0o100755, INIT.as_bytes(), (0, 0));
    let bytes = w.finish();
    let mut f =
        fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    f.write_all(&bytes)
        .with_context(|| format!("cannot write {}", out.display()))
}

/// A newc ("070701") cpio archive in memory.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
    ino: u32,
}

impl Writer {
    /// Adds one entry; `rdev` is (major, minor) for device nodes.
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: reproducible archives
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_end_with_the_trailer() {
        let mut w = Writer::default();
        w.entry("init", 0o100755, b"abc", (0, 0));
        let b = w.finish();
        assert!(b.starts_with(b"070701"));
        assert_eq!(b.len() % 4, 0);
        // Header (110) + "init\0" (5) padded to 116, data 3 padded to 4.
        assert_eq!(&b[110..114], b"init");
        assert_eq!(&b[116..119], b"abc");
        assert_eq!(&b[120..126], b"070701");
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("TRAILER!!!"));
        // File size field of the first entry.
        assert_eq!(&b[54..62], b"00000003");
    }
}
