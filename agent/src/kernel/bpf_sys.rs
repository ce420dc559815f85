//! Raw `bpf(2)` for what aya 0.14 has no API for: probing for ring buffers and
//! BPF netfilter links (BPF_PROG_TYPE_NETFILTER, kernel ≥ 6.4).

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_MAP_TYPE_RINGBUF: u32 = 27;
pub const BPF_PROG_TYPE_NETFILTER: u32 = 32;
pub const BPF_NETFILTER: u32 = 45;

pub const NFPROTO_IPV4: u32 = 2;
pub const NFPROTO_IPV6: u32 = 10;
pub const NF_INET_LOCAL_IN: u32 = 1;
pub const NF_INET_FORWARD: u32 = 2;
pub const NF_INET_LOCAL_OUT: u32 = 3;

/// The `bpf_attr` union, large enough for the commands used here; unused
/// bytes must be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    // SAFETY: attr is a valid bpf_attr-sized buffer that outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            size_of::<Attr>() as u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success these commands return a new file descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

/// Creates (and drops) a 4 KiB ring buffer map.
pub fn probe_ringbuf() -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, BPF_MAP_TYPE_RINGBUF);
    attr.put_u32(12, 4096);
    sys_bpf(BPF_MAP_CREATE, &mut attr).map(drop)
}

/// Loads a netfilter program: `r0 = verdict; exit`.
pub fn load_netfilter_verdict(verdict: i32) -> io::Result<OwnedFd> {
    let insns: [u64; 2] = [
        // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm = verdict
        0xb7 | ((verdict as u32 as u64) << 32),
        // BPF_JMP | BPF_EXIT
        0x95,
    ];
    let license = b"GPL\0";
    sys_bpf(
        BPF_PROG_LOAD,
        &mut netfilter_prog_attr(&insns, license, "podscope_p"),
    )
}

/// BPF_PROG_LOAD's attributes for a netfilter program; `insns` and
/// `license` must outlive the call that uses them.
fn netfilter_prog_attr(insns: &[u64], license: &[u8], name: &str) -> Attr {
    let mut attr = Attr::new();
    attr.put_u32(0, BPF_PROG_TYPE_NETFILTER);
    attr.put_u32(4, insns.len() as u32);
    attr.put_u64(8, insns.as_ptr() as u64);
    attr.put_u64(16, license.as_ptr() as u64);
    let n = name.len().min(15);
    attr.0[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    attr.put_u32(68, BPF_NETFILTER);
    attr
}

/// Links a netfilter program at a hook of the calling thread's network namespace.
pub fn link_netfilter(prog: &OwnedFd, pf: u32, hook: u32, priority: i32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut attr = Attr::new();
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(8, BPF_NETFILTER);
    attr.put_u32(16, pf);
    attr.put_u32(20, hook);
    attr.put_u32(24, priority as u32);
    sys_bpf(BPF_LINK_CREATE, &mut attr)
}

/// Loads an accept-everything netfilter program and links it, for a moment,
/// inside a fresh network namespace of its own thread: the node's own
/// namespaces never see it.
pub fn probe_netfilter_link() -> io::Result<()> {
    let prog = load_netfilter_verdict(1)?;
    std::thread::spawn(move || -> io::Result<()> {
        // SAFETY: unshare affects only this short-lived thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        link_netfilter(&prog, NFPROTO_IPV4, NF_INET_LOCAL_OUT, -100).map(drop)
    })
    .join()
    .map_err(|_| io::Error::other("netfilter probe thread panicked"))?
}

/// Loads a netfilter program from its (relocated) instructions; a refusal
/// carries the end of the verifier's log.
pub fn load_netfilter_program(insns: &[u64], name: &str) -> Result<OwnedFd, String> {
    let license = b"GPL\0";
    let mut attr = netfilter_prog_attr(insns, license, name);
    match sys_bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            // Again with the verifier's log, only to say why.
            let mut log = vec![0u8; 1 << 20];
            attr.put_u32(24, 1);
            attr.put_u32(28, log.len() as u32);
            attr.put_u64(32, log.as_mut_ptr() as u64);
            let _ = sys_bpf(BPF_PROG_LOAD, &mut attr);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let mut tail: Vec<&str> = text.lines().rev().take(6).collect();
            tail.reverse();
            Err(format!("{e}; verifier: {}", tail.join(" | ")))
        }
    }
}

/// Runs `f` on a thread that joined the network namespace at `netns` (on
/// this thread when None): netfilter links are per namespace, and setns(2)
/// changes only the calling thread.
pub fn in_netns<T: Send + 'static>(
    netns: Option<&std::path::Path>,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let Some(path) = netns else {
        return Ok(f());
    };
    let file = std::fs::File::open(path)?;
    std::thread::spawn(move || -> io::Result<T> {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this short-lived thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}
