//! Packet paths: new connections after the filter table (a BPF netfilter
//! program, linked with raw `bpf(2)` because aya 0.14 has no API for it) and
//! drops with the kernel's reason (`skb:kfree_skb`).
//!
//! The netfilter program is compiled into the same object as every other
//! family, in a section aya parses but never loads; its instructions are
//! relocated here against the maps aya created (so its globals and ring
//! buffer are the ones this module reads) and loaded as
//! BPF_PROG_TYPE_NETFILTER. Links are per network namespace: they are made
//! on a thread that joined the namespace where kube-proxy's rules are.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::SystemTime,
};

use agent_common::net::{
    ConnEvent, DROP_FLAG_CT, DROP_FLAG_L4, DROP_FLAG_NET_HEADER, DropEvent, IPS_DST_NAT,
    NetOffsets, TUPLE_LEN,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, RawTracePoint},
};
use serde::Serialize;

use super::{
    AttachType, Attachment, EBPF_OBJECT, FamilyStats, LoadOptions, Pass, ProbeError, attach_first,
    error_chain, program, take_family_maps,
};
use crate::kernel::{
    bpf_sys,
    btf::{Btf, BtfError},
    clock::BootClock,
};

pub const FAMILY_CONNS: &str = crate::families::Kernel::Netfilter.name();
pub const FAMILY_DROPS: &str = crate::families::Kernel::Drops.name();
const NF_PROGRAM: &str = "net_nf";
const OFFSETS_GLOBAL: &str = "NET_OFFSETS";
const CONN_EVENTS: &str = "NET_CONN_EVENTS";
const CONN_STATS: &str = "NET_CONN_STATS";
const DROP_EVENTS: &str = "NET_DROP_EVENTS";
const DROP_STATS: &str = "NET_DROP_STATS";

/// Right after the filter table (NF_IP_PRI_FILTER = 0): what the program
/// sees passed kube-proxy's rules, with nat done (DNAT at PRE_ROUTING and
/// LOCAL_OUT happens earlier). The kernel allows one BPF program per hook and
/// priority (EBUSY), so another podscope (a `trace` beside the agent) takes
/// the next free one, still before the security table (50).
const PRI_AFTER_FILTER: std::ops::RangeInclusive<i32> = 1..=40;

/// Where the program is linked: both families, the three hooks with a filter
/// table (forwarded pod traffic, traffic to the node, the node's own).
pub const HOOKS: [(u32, u32, &str); 6] = [
    (
        bpf_sys::NFPROTO_IPV4,
        bpf_sys::NF_INET_FORWARD,
        "ipv4/forward",
    ),
    (
        bpf_sys::NFPROTO_IPV4,
        bpf_sys::NF_INET_LOCAL_IN,
        "ipv4/local_in",
    ),
    (
        bpf_sys::NFPROTO_IPV4,
        bpf_sys::NF_INET_LOCAL_OUT,
        "ipv4/local_out",
    ),
    (
        bpf_sys::NFPROTO_IPV6,
        bpf_sys::NF_INET_FORWARD,
        "ipv6/forward",
    ),
    (
        bpf_sys::NFPROTO_IPV6,
        bpf_sys::NF_INET_LOCAL_IN,
        "ipv6/local_in",
    ),
    (
        bpf_sys::NFPROTO_IPV6,
        bpf_sys::NF_INET_LOCAL_OUT,
        "ipv6/local_out",
    ),
];

/// raw_tp first: the same program at the same cost as tp_btf, without the
/// BTF parse at attach (see `probes::AttachBtf`).
pub const DROP_PREFERENCE: [AttachType; 2] = [AttachType::RawTp, AttachType::TpBtf];

/// Where the packet probes' kernel fields are on this kernel.
pub fn resolve_offsets(btf: &Btf) -> Result<NetOffsets, BtfError> {
    let skb = |m| btf.offset_of("sk_buff", m);
    let tuplehash = btf.member("nf_conn", "tuplehash")?;
    let in_hash = btf.offset_of("nf_conntrack_tuple_hash", "tuple")?;
    let tuple_size = btf.member("nf_conntrack_tuple_hash", "tuple")?.size;
    if tuple_size as usize != TUPLE_LEN {
        return Err(BtfError::NoMember {
            strukt: format!(
                "nf_conntrack_tuple of {TUPLE_LEN} bytes (this kernel's has {tuple_size})"
            ),
            member: "tuple".into(),
        });
    }
    let hash_size = tuplehash.size / 2;
    let reason = |name: &str, default: u32| {
        btf.enum_value("skb_drop_reason", name)
            .ok()
            .flatten()
            .map(|v| v as u32)
            .unwrap_or(default)
    };
    // The socket's cgroup is optional (CONFIG_CGROUP_NET_CLASSID-era kernels
    // had a packed `val` instead): without it only the cgroup attribution of
    // the node's own connections is lost.
    let sock_cgroup = || -> Result<(u32, u32, u32, u32), BtfError> {
        Ok((
            skb("sk")?,
            btf.offset_of("sock", "sk_cgrp_data")? + btf.offset_of("sock_cgroup_data", "cgroup")?,
            btf.offset_of("cgroup", "kn")?,
            btf.offset_of("kernfs_node", "id")?,
        ))
    };
    let (skb_sk, sk_cgroup, cgroup_kn, kn_id) = sock_cgroup().unwrap_or((0, 0, 0, 0));
    Ok(NetOffsets {
        skb_sk,
        sk_cgroup,
        cgroup_kn,
        kn_id,
        skb_nfct: skb("_nfct")?,
        skb_head: skb("head")?,
        skb_network_header: skb("network_header")?,
        skb_transport_header: skb("transport_header")?,
        ct_status: btf.offset_of("nf_conn", "status")?,
        ct_tuple_orig: tuplehash.offset + in_hash,
        ct_tuple_reply: tuplehash.offset + hash_size + in_hash,
        state_hook: btf.offset_of("nf_hook_state", "hook")?,
        state_pf: btf.offset_of("nf_hook_state", "pf")?,
        reason_not_specified: reason("SKB_DROP_REASON_NOT_SPECIFIED", 2),
        reason_consumed: reason("SKB_CONSUMED", u32::MAX),
        reason_queue_purge: reason("SKB_DROP_REASON_QUEUE_PURGE", u32::MAX),
    })
}

/// The kernel's drop reasons by number, named as in `enum skb_drop_reason`
/// without the `SKB_DROP_REASON_` prefix (e.g. `NETFILTER_DROP`).
pub fn drop_reason_names(btf: &Btf) -> HashMap<u32, String> {
    btf.enum_values("skb_drop_reason")
        .unwrap_or_default()
        .into_iter()
        .map(|(name, v)| {
            let short = name
                .strip_prefix("SKB_DROP_REASON_")
                .unwrap_or(&name)
                .to_string();
            (v as u32, short)
        })
        .collect()
}

pub(super) fn configure<'a>(
    loader: &mut EbpfLoader<'a>,
    offsets: &'a NetOffsets,
    opts: &LoadOptions,
) {
    loader
        .override_global(OFFSETS_GLOBAL, offsets, true)
        .map_max_entries(CONN_EVENTS, opts.ring_buffer_bytes)
        .map_max_entries(DROP_EVENTS, opts.ring_buffer_bytes);
}

/// A connection's addresses as conntrack keeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Tuple {
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub proto: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl Tuple {
    /// From `struct nf_conntrack_tuple`'s bytes (layout in agent-common).
    pub fn decode(b: &[u8; TUPLE_LEN]) -> Option<Tuple> {
        let l3 = u16::from_ne_bytes([b[18], b[19]]);
        let ip = |o: usize| -> Option<IpAddr> {
            match l3 {
                2 => Some(IpAddr::V4(Ipv4Addr::new(
                    b[o],
                    b[o + 1],
                    b[o + 2],
                    b[o + 3],
                ))),
                10 => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&b[o..o + 16]);
                    Some(IpAddr::V6(Ipv6Addr::from(a)))
                }
                _ => None,
            }
        };
        Some(Tuple {
            proto: b[38],
            src: SocketAddr::new(ip(0)?, u16::from_be_bytes([b[16], b[17]])),
            dst: SocketAddr::new(ip(20)?, u16::from_be_bytes([b[36], b[37]])),
        })
    }

    /// From a packet's network header and its first four transport bytes.
    pub fn from_headers(nh: &[u8], l4: Option<&[u8; 4]>) -> Option<Tuple> {
        let (proto, src, dst): (u8, IpAddr, IpAddr) = match nh.first()? >> 4 {
            4 if nh.len() >= 20 => (
                nh[9],
                Ipv4Addr::new(nh[12], nh[13], nh[14], nh[15]).into(),
                Ipv4Addr::new(nh[16], nh[17], nh[18], nh[19]).into(),
            ),
            6 if nh.len() >= 40 => {
                let mut s = [0u8; 16];
                let mut d = [0u8; 16];
                s.copy_from_slice(&nh[8..24]);
                d.copy_from_slice(&nh[24..40]);
                (nh[6], Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into())
            }
            _ => return None,
        };
        let (sp, dp) = match (proto, l4) {
            (6 | 17 | 132, Some(p)) => (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            ),
            _ => (0, 0),
        };
        Some(Tuple {
            proto,
            src: SocketAddr::new(src, sp),
            dst: SocketAddr::new(dst, dp),
        })
    }
}

/// A new connection from the netfilter program's record; `None` when a
/// tuple is of no address family we know.
pub fn decode_conn(raw: &ConnEvent, clock: &BootClock) -> Option<RawConn> {
    let (orig, reply) = (Tuple::decode(&raw.orig)?, Tuple::decode(&raw.reply)?);
    Some(RawConn {
        ts: clock.to_system_time(raw.ts_boot_ns),
        orig,
        translated: reply.src,
        dnat: raw.ct_status & IPS_DST_NAT != 0,
        hook: raw.hook,
        cgroup_id: raw.cgroup_id,
    })
}

/// A drop from `skb:kfree_skb`'s record, its reason named from `reasons`.
pub fn decode_drop(raw: &DropEvent, reasons: &HashMap<u32, String>, clock: &BootClock) -> RawDrop {
    let packet = (raw.flags & DROP_FLAG_NET_HEADER != 0)
        .then(|| {
            Tuple::from_headers(
                &raw.net_header,
                (raw.flags & DROP_FLAG_L4 != 0).then_some(&raw.l4),
            )
        })
        .flatten();
    let ct = (raw.flags & DROP_FLAG_CT != 0)
        .then(|| Tuple::decode(&raw.orig))
        .flatten();
    RawDrop {
        ts: clock.to_system_time(raw.ts_boot_ns),
        reason: reasons
            .get(&raw.reason)
            .cloned()
            .unwrap_or_else(|| format!("reason_{}", raw.reason)),
        tuple: ct.or(packet),
        packet,
    }
}

/// A protocol number's name, as iptables writes it.
pub fn proto_name(p: u8) -> &'static str {
    match p {
        6 => "tcp",
        17 => "udp",
        132 => "sctp",
        1 | 58 => "icmp",
        _ => "other",
    }
}

/// A new connection that passed the filter table.
#[derive(Clone, Debug, PartialEq)]
pub struct RawConn {
    pub ts: SystemTime,
    /// Before nat: e.g. pod → ClusterIP:port.
    pub orig: Tuple,
    /// Where it goes after nat (the reply tuple's source): e.g. endpoint:port.
    pub translated: SocketAddr,
    pub dnat: bool,
    pub hook: u8,
    /// The sending local socket's v2 cgroup id (0: none, e.g. forwarded).
    pub cgroup_id: u64,
}

/// A packet the kernel dropped with a reason.
#[derive(Clone, Debug, PartialEq)]
pub struct RawDrop {
    pub ts: SystemTime,
    pub reason: String,
    /// The connection's original tuple when conntrack had one (before nat),
    /// else the packet's own addresses.
    pub tuple: Option<Tuple>,
    /// The packet's addresses as it was dropped (after any nat).
    pub packet: Option<Tuple>,
}

/// The attached packet probes.
pub struct NetProbe {
    conns: Option<(RingBuf<MapData>, PerCpuArray<MapData, u64>)>,
    drops: Option<(RingBuf<MapData>, PerCpuArray<MapData, u64>)>,
    /// The fallback for conns when netfilter links are refused.
    ct_events: Option<crate::net::conntrack::ConntrackEvents>,
    reasons: HashMap<u32, String>,
    clock: BootClock,
    // Links first: dropped before the program.
    _links: Vec<OwnedFd>,
    _prog: Option<OwnedFd>,
    pub attachments: Vec<Attachment>,
    /// Parts that could not attach: (family, why).
    pub unavailable: Vec<(&'static str, String)>,
}

impl NetProbe {
    /// Attaches kfree_skb and the netfilter links (in `netns`, or this
    /// thread's namespace). Either may fail alone; both failing is an error.
    pub fn attach(
        ebpf: &mut Ebpf,
        btf: &super::AttachBtf,
        reasons: HashMap<u32, String>,
        netns: Option<&Path>,
    ) -> Result<NetProbe, ProbeError> {
        let mut attachments = vec![];
        let mut unavailable = vec![];
        let drops = match attach_first(FAMILY_DROPS, DROP_PREFERENCE, |kind| {
            attach_drop(ebpf, btf, kind)
        }) {
            Ok((attach_type, refused)) => {
                attachments.push(Attachment {
                    family: FAMILY_DROPS,
                    hook: "skb:kfree_skb",
                    attach_type,
                    refused,
                });
                Some(take_family_maps(
                    ebpf,
                    FAMILY_DROPS,
                    DROP_EVENTS,
                    DROP_STATS,
                )?)
            }
            Err(e) => {
                unavailable.push((FAMILY_DROPS, e.to_string()));
                None
            }
        };
        // PODSCOPE_NET_FALLBACK=conntrack: use the older kernels' path here too (tests).
        let forced = std::env::var("PODSCOPE_NET_FALLBACK").is_ok_and(|v| v == "conntrack");
        let linked = if forced {
            Err("not tried (PODSCOPE_NET_FALLBACK=conntrack)".to_string())
        } else {
            link_netfilter(ebpf, netns)
        };
        let mut ct_events = None;
        let (conns, prog, links) = match linked {
            Ok((prog, links)) => {
                attachments.push(Attachment {
                    family: FAMILY_CONNS,
                    hook: "netfilter (ipv4, ipv6: forward, local_in, local_out; after filter)",
                    attach_type: AttachType::NetfilterLink,
                    refused: vec![],
                });
                (
                    Some(take_family_maps(
                        ebpf,
                        FAMILY_CONNS,
                        CONN_EVENTS,
                        CONN_STATS,
                    )?),
                    Some(prog),
                    links,
                )
            }
            Err(why) => {
                match crate::net::conntrack::ConntrackEvents::open(netns) {
                    Ok(ev) => {
                        attachments.push(Attachment {
                            family: FAMILY_CONNS,
                            hook: "conntrack netlink events (new connections, once confirmed)",
                            attach_type: AttachType::ConntrackEvents,
                            refused: vec![(AttachType::NetfilterLink, why)],
                        });
                        ct_events = Some(ev);
                    }
                    Err(e) => {
                        unavailable.push((FAMILY_CONNS, format!("{why}; conntrack events: {e}")))
                    }
                }
                (None, None, vec![])
            }
        };
        if drops.is_none() && conns.is_none() && ct_events.is_none() {
            let reasons = unavailable
                .iter()
                .map(|(f, w)| format!("{f}: {w}"))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ProbeError::Attach {
                family: FAMILY_CONNS,
                reasons,
            });
        }
        Ok(NetProbe {
            conns,
            drops,
            ct_events,
            reasons,
            clock: BootClock::new(),
            _links: links,
            _prog: prog,
            attachments,
            unavailable,
        })
    }

    pub fn ring_fds(&self) -> Vec<RawFd> {
        self.conns
            .iter()
            .chain(self.drops.iter())
            .map(|(r, _)| r.as_raw_fd())
            .chain(self.ct_events.as_ref().map(|e| e.fd()))
            .collect()
    }

    pub fn drain_conns(&mut self, pass: &mut Pass, mut f: impl FnMut(RawConn)) {
        if let Some(ev) = self.ct_events.as_mut() {
            ev.drain(pass, &mut f);
        }
        let Some((ring, _)) = self.conns.as_mut() else {
            return;
        };
        for _ in 0..pass.budget {
            let Some(item) = ring.next() else { return };
            if let Some(c) = super::raw_event(&item).and_then(|raw| decode_conn(&raw, &self.clock))
            {
                f(c);
            }
        }
        pass.more = true;
    }

    pub fn drain_drops(&mut self, pass: &mut Pass, mut f: impl FnMut(RawDrop)) {
        let Some((ring, _)) = self.drops.as_mut() else {
            return;
        };
        for _ in 0..pass.budget {
            let Some(item) = ring.next() else { return };
            if let Some(raw) = super::raw_event(&item) {
                f(decode_drop(&raw, &self.reasons, &self.clock));
            }
        }
        pass.more = true;
    }

    pub fn stats(&self) -> Vec<(&'static str, FamilyStats)> {
        let mut out = vec![];
        if let Some((_, s)) = &self.conns {
            out.push((FAMILY_CONNS, FamilyStats::from_slots(super::read_stats(s))));
        }
        if let Some((_, s)) = &self.drops {
            out.push((FAMILY_DROPS, FamilyStats::from_slots(super::read_stats(s))));
        }
        if let Some(ev) = &self.ct_events {
            out.push((
                FAMILY_CONNS,
                FamilyStats {
                    hits: ev.received,
                    emitted: ev.received,
                    lost: ev.lost,
                    ..FamilyStats::default()
                },
            ));
        }
        out
    }
}

fn attach_drop(ebpf: &mut Ebpf, btf: &super::AttachBtf, kind: AttachType) -> Result<(), String> {
    let err = |e: &dyn std::error::Error| error_chain(e);
    match kind {
        AttachType::TpBtf => {
            let btf = btf.get().ok_or("the kernel exposes no BTF")?;
            let p: &mut BtfTracePoint = program(ebpf, "net_kfree_skb_btf")?;
            p.load("kfree_skb", btf).map_err(|e| err(&e))?;
            p.attach().map_err(|e| err(&e))?;
        }
        AttachType::RawTp => {
            let p: &mut RawTracePoint = program(ebpf, "net_kfree_skb_raw")?;
            p.load().map_err(|e| err(&e))?;
            p.attach("kfree_skb").map_err(|e| err(&e))?;
        }
        other => return Err(format!("{other} is not a kfree_skb hook")),
    }
    Ok(())
}

fn map_fd(map: &Map) -> Option<RawFd> {
    let data = match map {
        Map::Array(m) | Map::PerCpuArray(m) | Map::RingBuf(m) | Map::HashMap(m) => m,
        Map::LruHashMap(m) | Map::PerCpuHashMap(m) | Map::Unsupported(m) => m,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

/// The netfilter program's instructions, relocated against the maps aya
/// created for this object.
fn relocated_netfilter_insns(ebpf: &Ebpf) -> Result<Vec<u64>, String> {
    let mut obj = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| error_chain(&e))?;
    let text_sections: std::collections::HashSet<usize> =
        obj.functions.keys().map(|(section, _)| *section).collect();
    let key = obj
        .programs
        .get(NF_PROGRAM)
        .map(|p| p.function_key())
        .ok_or_else(|| format!("program {NF_PROGRAM} is missing from the eBPF object"))?;
    // Only this program and the shared functions: the other programs' maps
    // may already have been taken out of `ebpf` by their families.
    let others: std::collections::HashSet<(usize, u64)> = obj
        .programs
        .iter()
        .filter(|(name, _)| *name != NF_PROGRAM)
        .map(|(_, p)| p.function_key())
        .collect();
    obj.programs.retain(|name, _| name == NF_PROGRAM);
    obj.functions.retain(|k, _| !others.contains(k));
    let fds: HashMap<String, RawFd> = ebpf
        .maps()
        .filter_map(|(name, m)| Some((name.to_string(), map_fd(m)?)))
        .collect();
    let maps: Vec<(String, RawFd, aya_obj::Map)> = obj
        .maps
        .iter()
        .filter_map(|(name, m)| Some((name.clone(), *fds.get(name)?, m.clone())))
        .collect();
    obj.relocate_maps(
        maps.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
        &text_sections,
    )
    .map_err(|e| error_chain(&e))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| error_chain(&e))?;
    let f = obj
        .functions
        .get(&key)
        .ok_or_else(|| format!("{NF_PROGRAM} vanished during relocation"))?;
    Ok(f.instructions
        .iter()
        .map(|i| {
            // SAFETY: bpf_insn is 8 plain bytes.
            unsafe { std::mem::transmute_copy::<_, u64>(i) }
        })
        .collect())
}

/// Loads the netfilter program and links it at every hook of [`HOOKS`].
fn link_netfilter(ebpf: &Ebpf, netns: Option<&Path>) -> Result<(OwnedFd, Vec<OwnedFd>), String> {
    let insns = relocated_netfilter_insns(ebpf)?;
    let prog = bpf_sys::load_netfilter_program(&insns, NF_PROGRAM)
        .map_err(|e| format!("the kernel refused the netfilter program: {e}"))?;
    let prog_fd = prog.try_clone().map_err(|e| e.to_string())?;
    let netns: Option<PathBuf> = netns.map(Path::to_path_buf);
    let links = bpf_sys::in_netns(netns.as_deref(), move || {
        HOOKS
            .iter()
            .map(|(pf, hook, name)| {
                let mut last = None;
                for priority in PRI_AFTER_FILTER {
                    match bpf_sys::link_netfilter(&prog_fd, *pf, *hook, priority) {
                        Ok(link) => return Ok(link),
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
                        Err(e) => return Err(format!("netfilter link at {name}: {e}")),
                    }
                }
                Err(format!(
                    "netfilter link at {name}: every priority after the filter table is taken ({})",
                    last.map(|e| e.to_string()).unwrap_or_default()
                ))
            })
            .collect::<Result<Vec<_>, String>>()
    })
    .map_err(|e| match &netns {
        Some(p) => format!("cannot enter the network namespace {}: {e}", p.display()),
        None => e.to_string(),
    })??;
    Ok((prog, links))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_conntrack_tuple() {
        let mut b = [0u8; TUPLE_LEN];
        b[0..4].copy_from_slice(&[198, 18, 0, 2]);
        b[16..18].copy_from_slice(&40000u16.to_be_bytes());
        b[18..20].copy_from_slice(&2u16.to_ne_bytes());
        b[20..24].copy_from_slice(&[198, 19, 0, 10]);
        b[36..38].copy_from_slice(&80u16.to_be_bytes());
        b[38] = 6;
        let t = Tuple::decode(&b).unwrap();
        assert_eq!(t.src, "198.18.0.2:40000".parse().unwrap());
        assert_eq!(t.dst, "198.19.0.10:80".parse().unwrap());
        assert_eq!(proto_name(t.proto), "tcp");
    }

    #[test]
    fn decodes_an_ipv4_header() {
        let mut nh = [0u8; 40];
        nh[0] = 0x45;
        nh[9] = 6;
        nh[12..16].copy_from_slice(&[198, 18, 0, 2]);
        nh[16..20].copy_from_slice(&[198, 18, 0, 3]);
        let l4 = [0x9c, 0x40, 0x1f, 0x90];
        let t = Tuple::from_headers(&nh, Some(&l4)).unwrap();
        assert_eq!(t.dst, "198.18.0.3:8080".parse().unwrap());
        assert_eq!(t.src.port(), 40000);
    }
}
