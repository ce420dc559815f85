//! Packet paths (the netfilter and drops families' kernel side), in a
//! network namespace of the scenario's own: no packet touches the machine's.
//!
//! - kfree_skb: a connection to a closed port on loopback is dropped with
//!   the kernel's `NO_SOCKET`, named from this kernel's BTF enum (the numbers
//!   differ between kernels).
//! - new connections: through the netfilter link where the kernel has them
//!   (≥ 6.4), else through conntrack's netlink events (the older kernels'
//!   path); which one must match the kernel's `netfilter_link` expectation
//!   when the runner gives one, so a regression of the link fails here. A
//!   DNAT rule in the namespace's nat output chain (nf_tables, written over
//!   netlink by `nlrules`: the VMs have busybox alone) must show as the
//!   connection's original and translated destination.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use super::{Context, Stop, Verdict, ensure, ensure_eq, fail, nlrules};
use crate::probes::{
    self, AttachType, KernelOffsets, LoadOptions, Pass,
    net::{FAMILY_CONNS, NetProbe, RawConn, RawDrop},
};

const WAIT: Duration = Duration::from_secs(10);
/// A Service-range address the DNAT rule rewrites (never routed anywhere).
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);

/// A thread parked in a fresh network namespace (loopback up), running the
/// closures it is sent; its namespace goes when it ends.
struct Netns {
    path: PathBuf,
    jobs: mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl Netns {
    fn new() -> Result<Netns, Stop> {
        let (tx, rx) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: unshare affects only this thread.
            let r = if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                Err(std::io::Error::last_os_error().to_string())
            } else {
                loopback_up().map(|()| {
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() };
                    PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id()))
                })
            };
            let _ = ready_tx.send(r);
            for job in rx {
                job();
            }
        });
        match ready_rx.recv() {
            Ok(Ok(path)) => Ok(Netns { path, jobs: tx }),
            Ok(Err(e)) => Err(Stop::Skip(format!("cannot make a network namespace: {e}"))),
            Err(_) => fail!("the namespace thread ended"),
        }
    }

    /// Runs `f` inside the namespace and returns its result.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
        rx.recv().ok()
    }
}

/// `ip link set lo up` without `ip` (the VMs have busybox only).
fn loopback_up() -> Result<(), String> {
    // SAFETY: a plain socket for the ioctl, closed below; ifreq is zeroed.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if s < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut ok = libc::ioctl(s, libc::SIOCGIFFLAGS as _, &mut req) == 0;
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        ok = ok && libc::ioctl(s, libc::SIOCSIFFLAGS as _, &mut req) == 0;
        let err = std::io::Error::last_os_error();
        libc::close(s);
        if ok {
            Ok(())
        } else {
            Err(format!("cannot bring lo up: {err}"))
        }
    }
}

fn wait<T>(
    probe: &mut NetProbe,
    mut take: impl FnMut(&mut NetProbe) -> Vec<T>,
    pred: impl Fn(&T) -> bool,
) -> Option<T> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(found) = take(probe).into_iter().find(|t| pred(t)) {
            return Some(found);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn drops(p: &mut NetProbe) -> Vec<RawDrop> {
    let mut v = vec![];
    p.drain_drops(&mut Pass::all(), |d| v.push(d));
    v
}

fn conns(p: &mut NetProbe) -> Vec<RawConn> {
    let mut v = vec![];
    p.drain_conns(&mut Pass::all(), |c| v.push(c));
    v
}

pub fn net_paths(ctx: &Context) -> Verdict {
    let offsets = KernelOffsets::from_sys_fs()?;
    if offsets.net.is_none() {
        return Err(Stop::Skip(
            "this kernel's BTF lacks the conntrack or sk_buff fields the packet probes read".into(),
        ));
    }
    let mut ebpf = probes::load_object(&offsets, &LoadOptions::default())?;
    let btf = probes::attach_btf();
    let ns = Netns::new()?;
    let mut probe = NetProbe::attach(
        &mut ebpf,
        &btf,
        offsets.drop_reasons.clone(),
        Some(&ns.path),
    )?;
    let conns_path = probe
        .attachments
        .iter()
        .find(|a| a.family == FAMILY_CONNS)
        .map(|a| a.attach_type);
    let refusal = probe
        .unavailable
        .iter()
        .find(|(f, _)| *f == FAMILY_CONNS)
        .map(|(_, why)| why.clone());
    let Some(conns_path) = conns_path else {
        fail!(
            "new connections are seen by neither a netfilter link nor conntrack events: {}",
            refusal.unwrap_or_default()
        )
    };
    // What this kernel is known to allow (the matrix says; the host's own
    // run does not): the link where it exists, the fallback where it does not.
    let want = ctx
        .expect
        .iter()
        .find(|(k, _)| k == "netfilter_link")
        .map(|(_, v)| match v.as_str() {
            "ok" => AttachType::NetfilterLink,
            _ => AttachType::ConntrackEvents,
        });
    if let Some(want) = want {
        ensure_eq!(conns_path, want, "the new-connection path");
    }

    // kfree_skb: a SYN to a closed port is dropped with NO_SOCKET.
    let port = ns
        .run(|| {
            let l = TcpListener::bind("127.0.0.1:0").ok()?;
            let p = l.local_addr().ok()?.port();
            drop(l);
            let _ = TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], p)),
                Duration::from_secs(1),
            );
            Some(p)
        })
        .flatten();
    let Some(port) = port else {
        fail!("cannot connect on the namespace's loopback")
    };
    let dropped = wait(&mut probe, drops, |d| {
        d.packet.is_some_and(|t| t.dst.port() == port)
    });
    let Some(dropped) = dropped else {
        fail!("no drop reported for the SYN to closed port {port}")
    };
    ensure_eq!(dropped.reason.as_str(), "NO_SOCKET", "drop reason");

    let mut detail = format!(
        "kfree_skb: NO_SOCKET for the SYN to closed port {port}; connections via {conns_path}"
    );

    // A DNAT in the namespace's nat OUTPUT chain, as kube-proxy writes for a
    // host-network client: CLUSTER_IP:80 → 127.0.0.1:<listener>.
    let listener = ns
        .run(|| {
            let l = TcpListener::bind("127.0.0.1:0").ok()?;
            let p = l.local_addr().ok()?.port();
            // Leaked on purpose into the namespace thread's life: closed with it.
            let fd = l.as_raw_fd();
            std::mem::forget(l);
            Some((p, fd))
        })
        .flatten();
    let Some((target, _fd)) = listener else {
        fail!("cannot listen in the namespace")
    };
    let cip = CLUSTER_IP.to_string();
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, target);
    let written = ns
        .run(move || {
            nlrules::add_loopback_address(CLUSTER_IP)
                .map_err(|e| format!("cannot add {CLUSTER_IP}/32 to lo: {e}"))?;
            nlrules::add_dnat(SocketAddrV4::new(CLUSTER_IP, 80), to)
                .map_err(|e| format!("cannot write the DNAT rule (nf_tables): {e}"))
        })
        .unwrap_or_else(|| Err("the namespace thread ended".into()));
    if let Err(e) = written {
        fail!("{e}")
    }
    let connected = ns
        .run(move || {
            TcpStream::connect_timeout(&SocketAddr::from((CLUSTER_IP, 80)), Duration::from_secs(2))
                .is_ok()
        })
        .unwrap_or(false);
    ensure!(connected, "the connection through the DNAT rule failed");
    let seen = wait(&mut probe, conns, |c| {
        c.orig.dst == SocketAddr::from((CLUSTER_IP, 80))
    });
    let Some(seen) = seen else {
        fail!("no connection reported for {cip}:80")
    };
    ensure!(seen.dnat, "the connection was not marked as DNATed");
    ensure_eq!(
        seen.translated,
        SocketAddr::from(([127, 0, 0, 1], target)),
        "translated destination"
    );
    detail.push_str(&format!("; DNAT {cip}:80 → {to} seen"));
    Ok(detail)
}
