//! What the packet scenario writes into its network namespace, over netlink
//! from the calling thread's namespace: an address on `lo` (rtnetlink) and a
//! DNAT rule in an nf_tables nat chain at the output hook, the rule
//! kube-proxy writes for a host-network client of a ClusterIP. Written here
//! rather than with `ip`, `iptables` and `nsenter` because the kernel
//! matrix's guests have busybox alone, on both architectures; the rule is
//! real all the same (nf_tables' own DNAT, conntrack underneath).

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// How long a reply may take before the write is an error (not a hang).
const REPLY_TIMEOUT_SECONDS: i64 = 5;

const NETLINK_ROUTE: i32 = 0;
const NETLINK_NETFILTER: i32 = 12;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;

const RTM_NEWADDR: u16 = 20;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_IPV4: u8 = 2;
const NF_INET_LOCAL_OUT: u32 = 3;
/// NF_IP_PRI_NAT_DST: where iptables' and nft's nat OUTPUT chains run.
const NF_IP_PRI_NAT_DST: i32 = -100;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;

/// The scenario's table and chain (in its own namespace, gone with it).
const TABLE: &str = "podscope_selftest";
const CHAIN: &str = "output";

/// One netlink message under construction.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend(0u32.to_ne_bytes()); // length, set by finish()
        buf.extend(kind.to_ne_bytes());
        buf.extend((flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend(seq.to_ne_bytes());
        buf.extend(0u32.to_ne_bytes()); // port id: the kernel fills ours in
        Msg { buf, nests: vec![] }
    }

    /// nf_tables' family header (`struct nfgenmsg`); `res_id` big-endian.
    fn nfgen(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut m = Msg::new(kind, flags, seq);
        m.buf.extend([family, 0]);
        m.buf.extend(res_id.to_be_bytes());
        m
    }

    fn nft(msg: u16, seq: u32) -> Msg {
        let flags = NLM_F_ACK | NLM_F_CREATE;
        Msg::nfgen(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            flags,
            seq,
            NFPROTO_IPV4,
            0,
        )
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Msg {
        self.buf.extend(((payload.len() + 4) as u16).to_ne_bytes());
        self.buf.extend(kind.to_ne_bytes());
        self.buf.extend(payload);
        self.pad();
        self
    }

    fn str(&mut self, kind: u16, s: &str) -> &mut Msg {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.attr(kind, &b)
    }

    /// nf_tables' integers are big-endian.
    fn be32(&mut self, kind: u16, v: u32) -> &mut Msg {
        self.attr(kind, &v.to_be_bytes())
    }

    fn nest(&mut self, kind: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.attr(kind | NLA_F_NESTED, &[])
    }

    fn end(&mut self) -> &mut Msg {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// `NFTA_DATA_VALUE` inside a nest of `kind` (cmp's and immediate's data).
    fn data(&mut self, kind: u16, value: &[u8]) -> &mut Msg {
        const NFTA_DATA_VALUE: u16 = 1;
        self.nest(kind).attr(NFTA_DATA_VALUE, value).end()
    }

    /// One expression of a rule: `NFTA_LIST_ELEM { NAME, DATA { … } }`.
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Msg)) -> &mut Msg {
        const NFTA_LIST_ELEM: u16 = 1;
        const NFTA_EXPR_NAME: u16 = 1;
        const NFTA_EXPR_DATA: u16 = 2;
        self.nest(NFTA_LIST_ELEM).str(NFTA_EXPR_NAME, name);
        self.nest(NFTA_EXPR_DATA);
        body(self);
        self.end().end()
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// A netlink socket of `protocol` in this thread's network namespace.
fn socket(protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket calls; the fd is owned right away.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT_SECONDS,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            size_of::<libc::timeval>() as u32,
        );
        Ok(sock)
    }
}

/// Sends `msgs` as one datagram and waits for the acknowledgement of each
/// sequence number in `acks`; the first error the kernel reports fails it.
fn transact(protocol: i32, msgs: Vec<Vec<u8>>, acks: &[u32]) -> io::Result<()> {
    let sock = socket(protocol)?;
    let out: Vec<u8> = msgs.concat();
    // SAFETY: send from a buffer we own; the kernel is the default peer.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            sock.as_raw_fd(),
            out.as_ptr() as *const libc::c_void,
            out.len(),
            0,
            &kernel as *const libc::sockaddr_nl as *const libc::sockaddr,
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut waiting: Vec<u32> = acks.to_vec();
    let mut buf = vec![0u8; 16 << 10];
    while !waiting.is_empty() {
        // SAFETY: recv into a buffer we own.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (seq, errno) in acks_in(&buf[..n as usize]) {
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(errno));
            }
            waiting.retain(|s| *s != seq);
        }
    }
    Ok(())
}

/// (sequence number, errno) of each NLMSG_ERROR in a datagram (0: an ack).
fn acks_in(mut b: &[u8]) -> Vec<(u32, i32)> {
    let mut out = vec![];
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < 16 || len > b.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= 20 {
            let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
            let error = i32::from_ne_bytes([b[16], b[17], b[18], b[19]]);
            out.push((seq, -error));
        }
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

/// `ip addr add ADDR/32 dev lo`, in this thread's namespace.
pub fn add_loopback_address(addr: Ipv4Addr) -> io::Result<()> {
    let lo = {
        // SAFETY: a NUL-terminated name.
        let i = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        if i == 0 {
            return Err(io::Error::last_os_error());
        }
        i
    };
    let mut m = Msg::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, 1);
    // struct ifaddrmsg: family, prefix length, flags, scope (universe), index.
    m.buf.extend([libc::AF_INET as u8, 32, 0, 0]);
    m.buf.extend(lo.to_ne_bytes());
    m.attr(IFA_LOCAL, &addr.octets())
        .attr(IFA_ADDRESS, &addr.octets());
    transact(NETLINK_ROUTE, vec![m.finish()], &[1])
}

/// The messages of [`add_dnat`]: a batch with the table, a nat chain at the
/// output hook, and `ip daddr FROM tcp dport FROMPORT dnat to TO`.
fn dnat_batch(from: SocketAddrV4, to: SocketAddrV4) -> (Vec<Vec<u8>>, Vec<u32>) {
    const NFTA_TABLE_NAME: u16 = 1;
    const NFTA_CHAIN_TABLE: u16 = 1;
    const NFTA_CHAIN_NAME: u16 = 3;
    const NFTA_CHAIN_HOOK: u16 = 4;
    const NFTA_CHAIN_TYPE: u16 = 7;
    const NFTA_HOOK_HOOKNUM: u16 = 1;
    const NFTA_HOOK_PRIORITY: u16 = 2;
    const NFTA_RULE_TABLE: u16 = 1;
    const NFTA_RULE_CHAIN: u16 = 2;
    const NFTA_RULE_EXPRESSIONS: u16 = 4;

    let begin = Msg::nfgen(NFNL_MSG_BATCH_BEGIN, 0, 1, 0, NFNL_SUBSYS_NFTABLES);
    let mut table = Msg::nft(NFT_MSG_NEWTABLE, 2);
    table.str(NFTA_TABLE_NAME, TABLE);
    let mut chain = Msg::nft(NFT_MSG_NEWCHAIN, 3);
    chain
        .str(NFTA_CHAIN_TABLE, TABLE)
        .str(NFTA_CHAIN_NAME, CHAIN)
        .nest(NFTA_CHAIN_HOOK)
        .be32(NFTA_HOOK_HOOKNUM, NF_INET_LOCAL_OUT)
        .be32(NFTA_HOOK_PRIORITY, NF_IP_PRI_NAT_DST as u32)
        .end()
        .str(NFTA_CHAIN_TYPE, "nat");
    let mut rule = Msg::nft(NFT_MSG_NEWRULE, 4);
    rule.str(NFTA_RULE_TABLE, TABLE)
        .str(NFTA_RULE_CHAIN, CHAIN)
        .nest(NFTA_RULE_EXPRESSIONS);
    // payload: load `len` bytes at `offset` of a header into register 1.
    let load = |m: &mut Msg, base: u32, offset: u32, len: u32| {
        m.expr("payload", |m| {
            m.be32(1, NFT_REG_1)
                .be32(2, base)
                .be32(3, offset)
                .be32(4, len);
        });
    };
    // cmp: register 1 == value.
    let equals = |m: &mut Msg, value: &[u8]| {
        m.expr("cmp", |m| {
            m.be32(1, NFT_REG_1).be32(2, 0).data(3, value);
        });
    };
    const NETWORK_HEADER: u32 = 1;
    const TRANSPORT_HEADER: u32 = 2;
    // ip daddr (offset 16 of the IPv4 header)
    load(&mut rule, NETWORK_HEADER, 16, 4);
    equals(&mut rule, &from.ip().octets());
    // meta l4proto tcp
    rule.expr("meta", |m| {
        const NFT_META_L4PROTO: u32 = 16;
        m.be32(1, NFT_REG_1).be32(2, NFT_META_L4PROTO);
    });
    equals(&mut rule, &[libc::IPPROTO_TCP as u8]);
    // tcp dport (offset 2 of the TCP header)
    load(&mut rule, TRANSPORT_HEADER, 2, 2);
    equals(&mut rule, &from.port().to_be_bytes());
    // dnat to TO: the address in register 1, the port in register 2.
    rule.expr("immediate", |m| {
        m.be32(1, NFT_REG_1).data(2, &to.ip().octets());
    });
    rule.expr("immediate", |m| {
        m.be32(1, NFT_REG_2).data(2, &to.port().to_be_bytes());
    });
    rule.expr("nat", |m| {
        const NFT_NAT_DNAT: u32 = 1;
        m.be32(1, NFT_NAT_DNAT)
            .be32(2, u32::from(NFPROTO_IPV4))
            .be32(3, NFT_REG_1)
            .be32(5, NFT_REG_2);
    });
    rule.end();
    let end = Msg::nfgen(NFNL_MSG_BATCH_END, 0, 5, 0, NFNL_SUBSYS_NFTABLES);
    (
        vec![
            begin.finish(),
            table.finish(),
            chain.finish(),
            rule.finish(),
            end.finish(),
        ],
        vec![2, 3, 4],
    )
}

/// `nft add rule ip podscope_selftest output ip daddr … tcp dport … dnat
/// to …` (with its table and nat chain), in this thread's namespace.
pub fn add_dnat(from: SocketAddrV4, to: SocketAddrV4) -> io::Result<()> {
    let (msgs, acks) = dnat_batch(from, to);
    transact(NETLINK_NETFILTER, msgs, &acks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_length_and_nests_close() {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_ACK, 7);
        m.nest(9).str(1, "ab").end();
        let b = m.finish();
        assert_eq!(
            u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize,
            b.len()
        );
        // The nest covers its header (4) and the padded attribute inside
        // ("ab\0": 4 + 3, padded to 8), as the kernel's nla_nest_end does.
        assert_eq!(u16::from_ne_bytes([b[16], b[17]]), 4 + 8);
        // The attribute's own length is unpadded.
        assert_eq!(u16::from_ne_bytes([b[20], b[21]]), 4 + 3);
        assert_eq!(u16::from_ne_bytes([b[18], b[19]]), 9 | NLA_F_NESTED);
        assert_eq!(b.len(), 16 + 4 + 8);
    }

    #[test]
    fn the_batch_is_framed_and_every_change_is_acknowledged() {
        let (msgs, acks) = dnat_batch(
            "198.19.0.1:80".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        );
        assert_eq!(msgs.len(), 5);
        let kind = |m: &Vec<u8>| u16::from_ne_bytes([m[4], m[5]]);
        assert_eq!(kind(&msgs[0]), NFNL_MSG_BATCH_BEGIN);
        assert_eq!(kind(&msgs[4]), NFNL_MSG_BATCH_END);
        assert_eq!(
            kind(&msgs[3]),
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE
        );
        assert_eq!(acks, [2, 3, 4]);
        let rule = &msgs[3];
        let has = |needle: &[u8]| rule.windows(needle.len()).any(|w| w == needle);
        assert!(has(&[198, 19, 0, 1]) && has(&[127, 0, 0, 1]));
        assert!(has(&8080u16.to_be_bytes()) && has(b"nat\0"));
    }

    #[test]
    fn errors_and_acks_are_read_from_a_reply() {
        let mut b = vec![];
        for (seq, err) in [(2u32, 0i32), (3, -libc::ENOENT)] {
            b.extend(36u32.to_ne_bytes());
            b.extend(NLMSG_ERROR.to_ne_bytes());
            b.extend([0u8; 2]);
            b.extend(seq.to_ne_bytes());
            b.extend([0u8; 4]);
            b.extend(err.to_ne_bytes());
            b.extend([0u8; 16]);
        }
        assert_eq!(acks_in(&b), [(2, 0), (3, libc::ENOENT)]);
    }
}
