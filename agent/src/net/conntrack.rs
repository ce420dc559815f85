//! The fallback for kernels without BPF netfilter links (before 6.4):
//! conntrack's own netlink events (NFNLGRP_CONNTRACK_NEW) give each new
//! connection's original and reply tuples once conntrack confirms it, that is
//! once its first packet passed every table: the forwarded connections.
//! Rejected and dropped ones still come from kfree_skb. What is lost against
//! the netfilter program: the socket can overflow under a burst (counted as
//! lost, ENOBUFS), each connection costs a netlink message instead of a
//! ring-buffer record, and nothing is reported when the node disabled
//! conntrack events (`net.netfilter.nf_conntrack_events=0`).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::SystemTime,
};

use agent_common::net::IPS_DST_NAT;

use crate::kernel::bpf_sys;
use crate::probes::{
    Pass,
    net::{RawConn, Tuple},
};

const NETLINK_NETFILTER: i32 = 12;
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// A conntrack event socket in one network namespace.
pub struct ConntrackEvents {
    sock: OwnedFd,
    pub lost: u64,
    pub received: u64,
}

impl ConntrackEvents {
    /// Subscribes to new-connection events in `netns` (this thread's when None).
    pub fn open(netns: Option<&Path>) -> io::Result<ConntrackEvents> {
        let sock = bpf_sys::in_netns(netns, || -> io::Result<OwnedFd> {
            // SAFETY: plain socket calls; the fd is owned right away.
            unsafe {
                let fd = libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    NETLINK_NETFILTER,
                );
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let sock = OwnedFd::from_raw_fd(fd);
                let mut addr: libc::sockaddr_nl = std::mem::zeroed();
                addr.nl_family = libc::AF_NETLINK as u16;
                addr.nl_groups = 1 << (NFNLGRP_CONNTRACK_NEW - 1);
                if libc::bind(
                    fd,
                    &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                    size_of::<libc::sockaddr_nl>() as u32,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                let size: i32 = 4 << 20;
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    &size as *const i32 as *const libc::c_void,
                    size_of::<i32>() as u32,
                );
                Ok(sock)
            }
        })??;
        Ok(ConntrackEvents {
            sock,
            lost: 0,
            received: 0,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The events waiting on the socket, within the pass's budget (counted
    /// in messages read, so a read may go over it by one buffer's worth).
    pub fn drain(&mut self, pass: &mut Pass, mut f: impl FnMut(RawConn)) {
        let mut buf = vec![0u8; 64 << 10];
        let mut taken = 0;
        loop {
            if taken >= pass.budget {
                pass.more = true;
                return;
            }
            // SAFETY: recv into a buffer we own.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::ENOBUFS) => {
                        self.lost += 1;
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => return,
                }
            }
            if n == 0 {
                return;
            }
            for conn in parse_messages(&buf[..n as usize]) {
                self.received += 1;
                taken += 1;
                f(conn);
            }
        }
    }
}

/// netlink attributes: (type without flags, payload).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((kind, payload))
    })
}

fn tuple(b: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, 0u8, 0u16, 0u16);
    for (k, v) in attrs(b) {
        match k {
            CTA_TUPLE_IP => {
                for (k, v) in attrs(v) {
                    let ip = match v.len() {
                        4 => IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
                        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).ok()?)),
                        _ => continue,
                    };
                    match k {
                        1 | 3 => src = Some(ip),
                        2 | 4 => dst = Some(ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, v) in attrs(v) {
                    match (k, v) {
                        (1, [p, ..]) => proto = *p,
                        (2, [a, b, ..]) => sport = u16::from_be_bytes([*a, *b]),
                        (3, [a, b, ..]) => dport = u16::from_be_bytes([*a, *b]),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        proto,
        src: SocketAddr::new(src?, sport),
        dst: SocketAddr::new(dst?, dport),
    })
}

/// The new-connection events in one datagram.
pub fn parse_messages(mut b: &[u8]) -> Vec<RawConn> {
    let mut out = vec![];
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < NLMSG_HDRLEN || len > b.len() {
            break;
        }
        let msg = &b[..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        if kind != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
            || msg.len() < NLMSG_HDRLEN + NFGENMSG_LEN
        {
            continue;
        }
        let (mut orig, mut reply, mut status) = (None, None, 0u32);
        for (k, v) in attrs(&msg[NLMSG_HDRLEN + NFGENMSG_LEN..]) {
            match k {
                CTA_TUPLE_ORIG => orig = tuple(v),
                CTA_TUPLE_REPLY => reply = tuple(v),
                CTA_STATUS if v.len() >= 4 => status = u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
                _ => {}
            }
        }
        if let (Some(orig), Some(reply)) = (orig, reply) {
            out.push(RawConn {
                ts: SystemTime::now(),
                orig,
                translated: reply.src,
                dnat: u64::from(status) & IPS_DST_NAT != 0,
                hook: u8::MAX,
                // Netlink events carry no socket.
                cgroup_id: 0,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 4) as u16).to_ne_bytes().to_vec();
        v.extend(kind.to_ne_bytes());
        v.extend(payload);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    fn tuple_attr(kind: u16, src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
        let ip = [nla(1, &src), nla(2, &dst)].concat();
        let proto = [
            nla(1, &[6]),
            nla(2, &sp.to_be_bytes()),
            nla(3, &dp.to_be_bytes()),
        ]
        .concat();
        nla(
            kind | 0x8000,
            &[nla(1 | 0x8000, &ip), nla(2 | 0x8000, &proto)].concat(),
        )
    }

    #[test]
    fn parses_a_dnat_connection() {
        let body = [
            vec![2, 0, 0, 0],
            tuple_attr(1, [198, 18, 0, 4], [198, 19, 0, 10], 40000, 80),
            tuple_attr(2, [198, 18, 0, 3], [198, 18, 0, 4], 8080, 40000),
            nla(3, &(0x20u32 | 0x8).to_be_bytes()),
        ]
        .concat();
        let mut msg = ((body.len() + 16) as u32).to_ne_bytes().to_vec();
        msg.extend(((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW).to_ne_bytes());
        msg.extend([0u8; 10]);
        msg.extend(body);
        let conns = parse_messages(&msg);
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0].orig.dst, "198.19.0.10:80".parse().unwrap());
        assert_eq!(conns[0].translated, "198.18.0.3:8080".parse().unwrap());
        assert!(conns[0].dnat);
    }
}
