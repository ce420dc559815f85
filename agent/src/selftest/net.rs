//! Packet paths (the netfilter and drops families' kernel side), in a
//! network namespace of the scenario's own: no packet touches the machine's.
//!
//! - kfree_skb: a connection to a closed port on loopback is dropped with
//!   the kernel's `NO_SOCKET`, named from this kernel's BTF enum (the numbers
//!   differ between kernels).
//! - the netfilter link: created in that namespace where the kernel has
//!   them (≥ 6.4); on older kernels its refusal must be visible (the probe
//!   reports the family unavailable and keeps kfree_skb). Where iptables is
//!   installed (not in the VMs' busybox), a DNAT rule in the namespace's nat
//!   OUTPUT chain must show as the connection's original and translated
//!   destination.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use super::{Context, Stop, Verdict, ensure, ensure_eq, fail};
use crate::probes::{
    self, KernelOffsets, LoadOptions,
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

fn command_exists(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
}

/// `nsenter --net=<ns> <cmd>`: true when it succeeded.
fn in_ns(ns: &Netns, cmd: &[&str]) -> bool {
    Command::new("nsenter")
        .arg(format!("--net={}", ns.path.display()))
        .args(cmd)
        .output()
        .is_ok_and(|o| o.status.success())
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
    p.drain_drops(|d| v.push(d));
    v
}

fn conns(p: &mut NetProbe) -> Vec<RawConn> {
    let mut v = vec![];
    p.drain_conns(|c| v.push(c));
    v
}

pub fn net_paths(_: &Context) -> Verdict {
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
        btf.as_ref(),
        offsets.drop_reasons.clone(),
        Some(&ns.path),
    )?;
    let link = probe.attachments.iter().any(|a| a.family == FAMILY_CONNS);
    let refusal = probe
        .unavailable
        .iter()
        .find(|(f, _)| *f == FAMILY_CONNS)
        .map(|(_, why)| why.clone());
    ensure!(
        link || refusal.is_some(),
        "the netfilter family is neither attached nor reported unavailable"
    );

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

    let mut detail = format!("kfree_skb: NO_SOCKET for the SYN to closed port {port}");
    if !link {
        detail.push_str(&format!(
            "; netfilter links refused, reported as unavailable ({})",
            refusal.unwrap_or_default()
        ));
        return Ok(detail);
    }
    detail.push_str("; netfilter links created in the scenario's namespace");
    if !command_exists("iptables") || !command_exists("nsenter") || !command_exists("ip") {
        detail.push_str(" (no iptables here: DNAT not exercised)");
        return Ok(detail);
    }

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
    let to = format!("127.0.0.1:{target}");
    ensure!(
        in_ns(
            &ns,
            &["ip", "addr", "add", &format!("{cip}/32"), "dev", "lo"]
        ) && in_ns(
            &ns,
            &[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                &cip,
                "-p",
                "tcp",
                "--dport",
                "80",
                "-j",
                "DNAT",
                "--to-destination",
                &to
            ],
        ),
        "cannot write the DNAT rule in the scenario's namespace"
    );
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
