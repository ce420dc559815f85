//! Packet paths: a BPF netfilter program after the filter table (new
//! connections, with conntrack's original and reply tuples, so the ClusterIP
//! and the endpoint it was translated to), and `skb:kfree_skb` (drops
//! anywhere, with the kernel's reason).
//!
//! aya 0.14 cannot load netfilter programs: `net_nf` sits in a section aya
//! parses (so the object still loads) and userspace loads its relocated
//! instructions itself with `bpf(2)` as BPF_PROG_TYPE_NETFILTER.

use agent_common::{
    net::{
        ConnEvent, DROP_FLAG_CT, DROP_FLAG_L4, DROP_FLAG_NET_HEADER, DropEvent, IP_CT_NEW,
        IPS_CONFIRMED, NET_HEADER_LEN, NFCT_INFOMASK, NetOffsets, TUPLE_LEN,
    },
    stats::{STAT_EMITTED, STAT_FILTERED, STAT_HITS, STAT_LOST, STAT_READ_ERRORS, STAT_SLOTS},
};
use aya_ebpf::{
    helpers::bpf_ktime_get_boot_ns,
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};

use crate::{kmem, ringbuf, stats::bump};

/// Set by userspace at load time from the kernel's BTF.
#[unsafe(no_mangle)]
static NET_OFFSETS: NetOffsets = NetOffsets {
    skb_nfct: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    ct_status: 0,
    ct_tuple_orig: 0,
    ct_tuple_reply: 0,
    state_hook: 0,
    state_pf: 0,
    reason_not_specified: 2,
    reason_consumed: u32::MAX,
    reason_queue_purge: u32::MAX,
    skb_sk: 0,
    sk_cgroup: 0,
    cgroup_kn: 0,
    kn_id: 0,
};

#[map]
static NET_CONN_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);
#[map]
static NET_CONN_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);
#[map]
static NET_DROP_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);
#[map]
static NET_DROP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

const NF_ACCEPT: i32 = 1;

#[inline(always)]
fn offsets() -> NetOffsets {
    // SAFETY: a volatile read keeps the compiler from folding the load-time value.
    unsafe { core::ptr::read_volatile(&NET_OFFSETS) }
}

/// The netfilter program (`struct bpf_nf_ctx { state; skb; }`). It never
/// changes a verdict. Established traffic only bumps a per-CPU counter.
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn net_nf(ctx: *const u64) -> i32 {
    bump(&NET_CONN_STATS, STAT_HITS);
    // SAFETY: the verifier allows 8-byte loads of bpf_nf_ctx's two pointers.
    let (state, skb) = unsafe { (*ctx as *const u8, *ctx.add(1) as *const u8) };
    let off = offsets();
    let Ok(nfct) = kmem::read::<u64>(skb, off.skb_nfct) else {
        bump(&NET_CONN_STATS, STAT_READ_ERRORS);
        return NF_ACCEPT;
    };
    if nfct == 0 || nfct & NFCT_INFOMASK != IP_CT_NEW {
        bump(&NET_CONN_STATS, STAT_FILTERED);
        return NF_ACCEPT;
    }
    let ct = (nfct & !NFCT_INFOMASK) as *const u8;
    let status = kmem::read::<u64>(ct, off.ct_status).unwrap_or(0);
    if status & IPS_CONFIRMED != 0 {
        // A retransmitted first packet: its connection was already reported.
        bump(&NET_CONN_STATS, STAT_FILTERED);
        return NF_ACCEPT;
    }
    let Some(mut entry) = NET_CONN_EVENTS.reserve::<ConnEvent>(0) else {
        bump(&NET_CONN_STATS, STAT_LOST);
        return NF_ACCEPT;
    };
    let mut orig = [0u8; TUPLE_LEN];
    let mut reply = [0u8; TUPLE_LEN];
    if kmem::read_buf(ct, off.ct_tuple_orig, &mut orig).is_err()
        || kmem::read_buf(ct, off.ct_tuple_reply, &mut reply).is_err()
    {
        bump(&NET_CONN_STATS, STAT_READ_ERRORS);
    }
    entry.write(ConnEvent {
        ts_boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        ct_status: status,
        orig,
        reply,
        hook: kmem::read::<u8>(state, off.state_hook).unwrap_or(0xff),
        pf: kmem::read::<u8>(state, off.state_pf).unwrap_or(0),
        _pad: [0; 6],
        cgroup_id: socket_cgroup_id(skb, &off),
    });
    ringbuf::submit(&NET_CONN_EVENTS, entry);
    bump(&NET_CONN_STATS, STAT_EMITTED);
    NF_ACCEPT
}

/// The v2 cgroup id of the packet's local socket (skb->sk->sk_cgrp_data
/// .cgroup->kn->id), or 0: forwarded packets have no socket of this
/// namespace, and a kernel without the fields leaves `skb_sk` at 0.
#[inline(always)]
fn socket_cgroup_id(skb: *const u8, off: &NetOffsets) -> u64 {
    if off.skb_sk == 0 {
        return 0;
    }
    let Ok(sk) = kmem::read_ptr(skb, off.skb_sk) else {
        return 0;
    };
    if sk.is_null() {
        return 0;
    }
    let Ok(cgrp) = kmem::read_ptr(sk, off.sk_cgroup) else {
        return 0;
    };
    if cgrp.is_null() {
        return 0;
    }
    kmem::read_ptr(cgrp, off.cgroup_kn)
        .and_then(|kn| kmem::read::<u64>(kn, off.kn_id))
        .unwrap_or(0)
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn net_kfree_skb_btf(ctx: BtfTracePointContext) -> i32 {
    // (skb, location, reason[, rx_sk])
    let skb: *const u8 = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    on_kfree_skb(skb, reason as u32);
    0
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn net_kfree_skb_raw(ctx: RawTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    on_kfree_skb(skb, reason as u32);
    0
}

#[inline(always)]
fn on_kfree_skb(skb: *const u8, reason: u32) {
    bump(&NET_DROP_STATS, STAT_HITS);
    let off = offsets();
    if reason == off.reason_not_specified
        || reason == off.reason_consumed
        || reason == off.reason_queue_purge
        || reason == 0
    {
        bump(&NET_DROP_STATS, STAT_FILTERED);
        return;
    }
    let Some(mut entry) = NET_DROP_EVENTS.reserve::<DropEvent>(0) else {
        bump(&NET_DROP_STATS, STAT_LOST);
        return;
    };
    let mut flags = 0u32;
    let mut orig = [0u8; TUPLE_LEN];
    let nfct = kmem::read::<u64>(skb, off.skb_nfct).unwrap_or(0);
    if nfct != 0 {
        let ct = (nfct & !NFCT_INFOMASK) as *const u8;
        if kmem::read_buf(ct, off.ct_tuple_orig, &mut orig).is_ok() {
            flags |= DROP_FLAG_CT;
        }
    }
    let mut net_header = [0u8; NET_HEADER_LEN];
    let mut l4 = [0u8; 4];
    if let Ok(head) = kmem::read_ptr(skb, off.skb_head) {
        let nh = kmem::read::<u16>(skb, off.skb_network_header).unwrap_or(0xffff);
        let th = kmem::read::<u16>(skb, off.skb_transport_header).unwrap_or(0xffff);
        // 0xffff: the header was never set.
        if nh != 0xffff && kmem::read_buf(head, u32::from(nh), &mut net_header).is_ok() {
            flags |= DROP_FLAG_NET_HEADER;
        }
        if th != 0xffff && th > nh && kmem::read_buf(head, u32::from(th), &mut l4).is_ok() {
            flags |= DROP_FLAG_L4;
        }
    }
    let version = net_header[0] >> 4;
    if flags & DROP_FLAG_NET_HEADER == 0 || (version != 4 && version != 6) {
        // Not an IP packet (or no header to tell): nothing to attribute.
        entry.discard(0);
        bump(&NET_DROP_STATS, STAT_FILTERED);
        return;
    }
    entry.write(DropEvent {
        ts_boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        reason,
        flags,
        orig,
        net_header,
        l4,
        _pad: 0,
    });
    ringbuf::submit(&NET_DROP_EVENTS, entry);
    bump(&NET_DROP_STATS, STAT_EMITTED);
}
