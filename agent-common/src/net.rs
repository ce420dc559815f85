//! Packet paths through kube-proxy's rules: new connections seen by a BPF
//! netfilter program after the filter table (`ConnEvent`), and packets the
//! kernel dropped with a reason (`skb:kfree_skb`, `DropEvent`).

/// `struct nf_conntrack_tuple` is copied whole: src.u3 (16 bytes) @0,
/// src.u (port, big-endian) @16, src.l3num @18, dst.u3 @20, dst.u (port) @36,
/// dst.protonum @38, dst.dir @39. Userspace checks the size against BTF.
pub const TUPLE_LEN: usize = 40;
/// The first bytes of the network header a drop event carries (an IPv6
/// header is 40 bytes; IPv4's fixed part 20).
pub const NET_HEADER_LEN: usize = 40;

/// `ct_status` bits (include/uapi/linux/netfilter/nf_conntrack_common.h).
pub const IPS_CONFIRMED: u64 = 1 << 3;
pub const IPS_DST_NAT: u64 = 1 << 5;
/// `skb->_nfct & NFCT_INFOMASK` is the ctinfo; IP_CT_NEW is 2.
pub const NFCT_INFOMASK: u64 = 7;
pub const IP_CT_NEW: u64 = 2;

/// Drop event flags.
pub const DROP_FLAG_CT: u32 = 1;
pub const DROP_FLAG_NET_HEADER: u32 = 2;
pub const DROP_FLAG_L4: u32 = 4;

/// Kernel offsets and drop-reason numbers, from BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetOffsets {
    pub skb_nfct: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub ct_status: u32,
    /// `nf_conn.tuplehash[IP_CT_DIR_ORIGINAL].tuple`.
    pub ct_tuple_orig: u32,
    /// `nf_conn.tuplehash[IP_CT_DIR_REPLY].tuple`.
    pub ct_tuple_reply: u32,
    pub state_hook: u32,
    pub state_pf: u32,
    /// `SKB_DROP_REASON_NOT_SPECIFIED`: too common and too vague to send.
    pub reason_not_specified: u32,
    /// `SKB_CONSUMED` (newer kernels pass it to kfree_skb for freed, not dropped, skbs).
    pub reason_consumed: u32,
    /// `SKB_DROP_REASON_QUEUE_PURGE`: a socket's queue freed as it closes, not a packet lost.
    pub reason_queue_purge: u32,
    /// `sk_buff.sk`; 0 when the socket's cgroup cannot be read (no
    /// `sock_cgroup_data.cgroup` in this kernel's BTF).
    pub skb_sk: u32,
    /// `sock.sk_cgrp_data` + `sock_cgroup_data.cgroup`: the socket's v2 cgroup.
    pub sk_cgroup: u32,
    /// `cgroup.kn`.
    pub cgroup_kn: u32,
    /// `kernfs_node.id`: the cgroup id.
    pub kn_id: u32,
}

/// A new connection (its first packet, conntrack entry not yet confirmed)
/// that passed the filter table.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnEvent {
    pub ts_boot_ns: u64,
    pub ct_status: u64,
    pub orig: [u8; TUPLE_LEN],
    pub reply: [u8; TUPLE_LEN],
    /// `NF_INET_*` hook and `NFPROTO_*` family the program ran at.
    pub hook: u8,
    pub pf: u8,
    pub _pad: [u8; 6],
    /// The v2 cgroup id of the local socket that sent the packet (the
    /// node's own traffic: hostNetwork pods); 0 for forwarded packets,
    /// which carry no local socket.
    pub cgroup_id: u64,
}

/// A packet freed with a drop reason.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DropEvent {
    pub ts_boot_ns: u64,
    pub reason: u32,
    pub flags: u32,
    /// The conntrack entry's original tuple (with DROP_FLAG_CT): the
    /// destination before DNAT, e.g. the ClusterIP.
    pub orig: [u8; TUPLE_LEN],
    pub net_header: [u8; NET_HEADER_LEN],
    /// Source and destination ports (big-endian), with DROP_FLAG_L4.
    pub l4: [u8; 4],
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    unsafe impl aya::Pod for super::NetOffsets {}
    unsafe impl aya::Pod for super::ConnEvent {}
    unsafe impl aya::Pod for super::DropEvent {}
}
