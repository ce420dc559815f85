//! Loading podscope's eBPF object and attaching each family's programs.
//!
//! One object holds every family's programs and maps. Each family module
//! resolves the kernel offsets it needs from BTF, sets them as load-time
//! globals, picks the best hook the kernel accepts by trying them in order,
//! and decodes its own ring buffer.

pub mod capabilities;
pub mod cgroups;
pub mod exits;
pub mod net;
pub mod oom;
pub mod signals;
pub mod throttle;

mod loader;

use std::fmt;

use aya::{Ebpf, EbpfLoader};
use serde::Serialize;
use thiserror::Error;

use crate::kernel::btf::{Btf, BtfError};

/// The eBPF object built by `agent-ebpf` and embedded at build time.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "this podscope binary was built without its eBPF programs (AYA_BUILD_SKIP was set): rebuild it with `cargo build`"
    )]
    NoObject,
    #[error("cannot load podscope's eBPF object: {0}")]
    Load(String),
    #[error("cannot attach the {family} probe: {reasons}")]
    Attach {
        family: &'static str,
        reasons: String,
    },
    #[error("the {family} probe's map {map} is missing or of the wrong type: {detail}")]
    Map {
        family: &'static str,
        map: &'static str,
        detail: String,
    },
}

/// How a program is hooked into the kernel, best first within each family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachType {
    Fentry,
    TpBtf,
    RawTp,
    Tracepoint,
    Kprobe,
    NetfilterLink,
    /// Not a BPF hook: conntrack's netlink events, the packet paths'
    /// fallback on kernels without netfilter links.
    ConntrackEvents,
}

impl fmt::Display for AttachType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachType::Fentry => "fentry",
            AttachType::TpBtf => "tp_btf",
            AttachType::RawTp => "raw_tp",
            AttachType::Tracepoint => "tracepoint",
            AttachType::Kprobe => "kprobe",
            AttachType::NetfilterLink => "netfilter_link",
            AttachType::ConntrackEvents => "conntrack_events",
        })
    }
}

/// What a family attached, and what it tried first.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    pub family: &'static str,
    pub hook: &'static str,
    pub attach_type: AttachType,
    /// Better attach types that were tried and refused, with the kernel's reason.
    pub refused: Vec<(AttachType, String)>,
}

/// Every family's kernel struct offsets, resolved from BTF before anything
/// is loaded, so the BTF reader's memory is gone by the time aya parses the
/// same BTF for itself.
#[derive(Clone, Debug)]
pub struct KernelOffsets {
    pub exits: agent_common::exits::ExitOffsets,
    pub cgroups: agent_common::cgroups::CgroupOffsets,
    pub signals: agent_common::signals::SignalOffsets,
    pub oom: agent_common::oom::OomOffsets,
    /// None: this kernel's BTF lacks a field the packet probes need.
    pub net: Option<agent_common::net::NetOffsets>,
    /// `enum skb_drop_reason`'s names by value.
    pub drop_reasons: std::collections::HashMap<u32, String>,
    /// Optional: a kernel without CFS bandwidth control has none, and only
    /// the throttle family is then unavailable.
    pub throttle: Result<agent_common::throttle::ThrottleOffsets, String>,
}

impl KernelOffsets {
    pub fn resolve(btf: &Btf) -> Result<KernelOffsets, BtfError> {
        Ok(KernelOffsets {
            exits: exits::resolve_offsets(btf)?,
            cgroups: cgroups::resolve_offsets(btf)?,
            signals: signals::resolve_offsets(btf)?,
            oom: oom::resolve_offsets(btf),
            net: net::resolve_offsets(btf)
                .inspect_err(|e| tracing::debug!("packet probes unavailable: {e}"))
                .ok(),
            drop_reasons: net::drop_reason_names(btf),
            throttle: throttle::resolve_offsets(btf).map_err(|e| e.to_string()),
        })
    }

    /// From the running kernel's BTF.
    pub fn from_sys_fs() -> Result<KernelOffsets, BtfError> {
        KernelOffsets::resolve(&Btf::from_sys_fs()?)
    }
}

/// aya's parse of the running kernel's BTF, which only tp_btf and fentry
/// programs need (to find their target at load), made the first time a
/// family asks for it. Every family tries a hook that needs no BTF first
/// (raw_tp runs the same code at the same cost), so on a kernel where
/// those attach the parse never happens: it is the largest allocation
/// podscope would make (about 25 MiB at its peak on a 6.x kernel).
#[derive(Default)]
pub struct AttachBtf(std::cell::OnceCell<Option<aya::Btf>>);

impl AttachBtf {
    /// The parse, made now if not yet; None if the BTF cannot be read.
    pub fn get(&self) -> Option<&aya::Btf> {
        self.0.get_or_init(kernel_btf_for_aya).as_ref()
    }

    /// Whether some family needed it (for the start-up memory log).
    pub fn parsed(&self) -> bool {
        self.0.get().is_some()
    }
}

/// A lazy [`AttachBtf`] for one round of attaching.
pub fn attach_btf() -> AttachBtf {
    AttachBtf::default()
}

/// aya's parse of the kernel's BTF, from `--btf PATH` when given.
pub fn kernel_btf_for_aya() -> Option<aya::Btf> {
    aya::Btf::parse_file(
        crate::kernel::btf::kernel_btf_path(),
        aya::Endianness::default(),
    )
    .ok()
}

/// Options that shape the loaded object.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Size of each family's ring buffer, bytes (a power of two, ≥ 4096).
    pub ring_buffer_bytes: u32,
    /// Wake the reader once this many bytes wait (0: at every event). The
    /// reader also drains on a timer, which bounds the latency.
    pub wakeup_bytes: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            ring_buffer_bytes: 1 << 20,
            wakeup_bytes: 64 << 10,
        }
    }
}

/// The default size of each busy family's ring (exits, signals, packets):
/// 512 KiB per online CPU, as a power of two between 1 and 8 MiB. Events
/// arrive at a rate that grows with the CPUs making them: 512 KiB holds
/// about 6,000 exit events, more than a CPU fully busy forking makes in
/// half a second here (BENCHMARKS.md), so a reader held up that long loses
/// nothing. It is also the process's largest memory: the kernel maps each
/// ring's data twice (for records that wrap), so a ring of N bytes shows
/// as 2N of resident memory, though it occupies N (charged once to the
/// agent's memory cgroup): the cap keeps four rings within the DaemonSet's
/// memory limit on any node.
pub fn default_ring_buffer_bytes() -> u32 {
    // SAFETY: sysconf reads a value; no memory is touched.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u64;
    ring_buffer_bytes_for(cpus)
}

fn ring_buffer_bytes_for(cpus: u64) -> u32 {
    (cpus.min(1 << 16) * (512 << 10))
        .next_power_of_two()
        .clamp(1 << 20, 8 << 20) as u32
}

impl LoadOptions {
    pub fn with_ring_buffer(ring_buffer_bytes: u32) -> LoadOptions {
        LoadOptions {
            ring_buffer_bytes,
            // A sixteenth of the ring: plenty of headroom for a burst.
            wakeup_bytes: u64::from(ring_buffer_bytes / 16),
        }
    }
}

/// Loads the object with every family's globals set. Programs are not yet
/// loaded into the kernel; each family does that when it attaches.
pub fn load_object(offsets: &KernelOffsets, opts: &LoadOptions) -> Result<Ebpf, ProbeError> {
    if EBPF_OBJECT.is_empty() {
        return Err(ProbeError::NoObject);
    }
    // The kernel side wakes the reader at multiples of this: a power of two.
    let wakeup_bytes = power_of_two_floor(opts.wakeup_bytes);
    let mut loader = loader::without_kernel_btf();
    loader.override_global("RINGBUF_WAKEUP_BYTES", &wakeup_bytes, true);
    exits::configure(&mut loader, &offsets.exits, opts);
    cgroups::configure(&mut loader, &offsets.cgroups);
    signals::configure(&mut loader, &offsets.signals, opts);
    oom::configure(&mut loader, &offsets.oom);
    if let Some(net) = &offsets.net {
        net::configure(&mut loader, net, opts);
    }
    throttle::configure(&mut loader, &offsets.throttle);
    loader
        .load(EBPF_OBJECT)
        .map_err(|e| ProbeError::Load(error_chain(&e)))
}

/// The largest power of two not above `n` (0 stays 0: wake at every event).
fn power_of_two_floor(n: u64) -> u64 {
    n.checked_ilog2().map_or(0, |log| 1 << log)
}

/// Loads the object without setting any family's globals, for `doctor`'s
/// tiny programs, which need no kernel offsets.
pub fn load_object_for_probing(btf: Option<&aya::Btf>) -> Result<Ebpf, ProbeError> {
    if EBPF_OBJECT.is_empty() {
        return Err(ProbeError::NoObject);
    }
    EbpfLoader::new()
        .btf(btf)
        .load(EBPF_OBJECT)
        .map_err(|e| ProbeError::Load(error_chain(&e)))
}

#[cfg(test)]
mod ring_size_tests {
    #[test]
    fn the_default_ring_grows_with_the_cpus_within_bounds() {
        use super::ring_buffer_bytes_for as f;
        assert_eq!(f(1), 1 << 20);
        assert_eq!(f(2), 1 << 20);
        assert_eq!(f(3), 2 << 20);
        assert_eq!(f(16), 8 << 20);
        assert_eq!(f(96), 8 << 20);
        assert_eq!(f(u64::MAX), 8 << 20);
    }
}

/// Tries each hook type in order until one attaches: the chosen type and
/// the refusals before it, or one error with every reason.
pub(crate) fn attach_first(
    family: &'static str,
    kinds: impl IntoIterator<Item = AttachType>,
    mut try_attach: impl FnMut(AttachType) -> Result<(), String>,
) -> Result<(AttachType, Vec<(AttachType, String)>), ProbeError> {
    let mut refused = vec![];
    for kind in kinds {
        match try_attach(kind) {
            Ok(()) => return Ok((kind, refused)),
            Err(reason) => refused.push((kind, reason)),
        }
    }
    let reasons = refused
        .iter()
        .map(|(k, r)| format!("{k}: {r}"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(ProbeError::Attach { family, reasons })
}

/// A family's ring buffer and per-CPU stats array, taken out of the object.
pub(crate) fn take_family_maps(
    ebpf: &mut Ebpf,
    family: &'static str,
    events_map: &'static str,
    stats_map: &'static str,
) -> Result<
    (
        aya::maps::RingBuf<aya::maps::MapData>,
        aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    ),
    ProbeError,
> {
    let map_err = |map, detail: String| ProbeError::Map {
        family,
        map,
        detail,
    };
    let events = ebpf
        .take_map(events_map)
        .ok_or_else(|| map_err(events_map, "absent".into()))
        .and_then(|m| {
            aya::maps::RingBuf::try_from(m).map_err(|e| map_err(events_map, e.to_string()))
        })?;
    let stats = ebpf
        .take_map(stats_map)
        .ok_or_else(|| map_err(stats_map, "absent".into()))
        .and_then(|m| {
            aya::maps::PerCpuArray::try_from(m).map_err(|e| map_err(stats_map, e.to_string()))
        })?;
    Ok((events, stats))
}

/// A raw event out of a ring buffer record (or any bytes): `None` when the
/// record is shorter than `T` (shorter records are skipped, longer ones
/// read up to `T`'s size). The one place raw bytes become a raw event.
pub fn raw_event<T: aya::Pod>(item: &[u8]) -> Option<T> {
    if item.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: T is Pod (valid for any bytes) and the record holds at least
    // size_of::<T>() of them; unaligned because the ring buffer only
    // guarantees 8-byte alignment.
    Some(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const T) })
}

/// Records one drain pass takes from each ring at most. A storm that
/// outruns the reader then waits in the kernel's ring (where it is counted
/// as lost once the ring is full) rather than in this process's memory:
/// without a bound, a pass went on reading for as long as the storm wrote,
/// 100,000 signals and 150 MiB resident in one pass here.
pub const PASS_BUDGET: usize = 4096;

/// What one drain pass may take, shared by the families drained in it.
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    /// Records per ring.
    pub budget: usize,
    /// Boot-clock ns: the ordered families take nothing stamped later.
    /// Lowered when an ordered family fills its budget, so that a family
    /// drained after it (exits after signals) does not run ahead of the
    /// records it left in its ring: forensics must see a SIGKILL before the
    /// exit it caused.
    pub until_ns: u64,
    /// A ring still had records when its budget ran out: another pass is
    /// due at once. (A record set aside because it was stamped after the
    /// pass began waits for the next pass in the usual way.)
    pub more: bool,
}

impl Pass {
    /// A pass of `budget` records a ring that takes nothing stamped after
    /// now: a SIGKILL committed while the signals ring was being read, and
    /// the exit it caused, both wait for the next pass (the signal and OOM
    /// programs stamp before they reserve, so a record stamped before now
    /// and still uncommitted cannot have caused a later exit yet).
    pub fn new(budget: usize) -> Pass {
        Pass {
            budget,
            until_ns: crate::kernel::clock::boot_ns(),
            more: false,
        }
    }

    /// Everything waiting, whenever stamped (tests and self-tests, which
    /// read small batches; the last pass at stop).
    pub fn all() -> Pass {
        Pass::unstamped(usize::MAX)
    }

    /// `budget` records a ring, whenever stamped.
    pub fn unstamped(budget: usize) -> Pass {
        Pass {
            budget,
            until_ns: u64::MAX,
            more: false,
        }
    }
}

/// A raw event's boot-clock stamp, for families whose order against the
/// others matters (the forensics chain OOM → signal → exit).
pub(crate) trait Stamped {
    fn stamp_ns(&self) -> u64;
}

/// A family's ring buffer and per-CPU stats, read the same way by every
/// family: raw `#[repr(C)]` events out, counters summed over the CPUs.
pub(crate) struct FamilyMaps {
    events: aya::maps::RingBuf<aya::maps::MapData>,
    stats: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    /// A record read past a pass's `until_ns`, delivered first next pass
    /// (empty: none). A ring cannot be peeked at: reading a record frees it.
    set_aside: Vec<u8>,
}

impl FamilyMaps {
    pub(crate) fn take(
        ebpf: &mut Ebpf,
        family: &'static str,
        events_map: &'static str,
        stats_map: &'static str,
    ) -> Result<FamilyMaps, ProbeError> {
        let (events, stats) = take_family_maps(ebpf, family, events_map, stats_map)?;
        Ok(FamilyMaps {
            events,
            stats,
            set_aside: vec![],
        })
    }

    /// The raw events waiting, in order, within the pass's budget; returns
    /// how many. `T` must be the type the kernel side writes (shorter
    /// records are skipped).
    pub(crate) fn drain<T: aya::Pod>(&mut self, pass: &mut Pass, mut f: impl FnMut(T)) -> usize {
        let mut n = 0;
        while n < pass.budget {
            let Some(item) = self.events.next() else {
                return n;
            };
            if let Some(raw) = raw_event::<T>(&item) {
                f(raw);
                n += 1;
            }
        }
        pass.more = true;
        n
    }

    /// As [`FamilyMaps::drain`], for a family ordered by its stamps: takes
    /// nothing stamped after `pass.until_ns`, and when its budget runs out
    /// lowers `until_ns` to its last record's stamp for the families after it.
    pub(crate) fn drain_ordered<T: aya::Pod + Stamped>(
        &mut self,
        pass: &mut Pass,
        mut f: impl FnMut(T),
    ) -> usize {
        let mut n = 0;
        let mut last = 0;
        if !self.set_aside.is_empty() {
            match raw_event::<T>(&self.set_aside) {
                Some(raw) if raw.stamp_ns() > pass.until_ns => return 0,
                Some(raw) => {
                    last = raw.stamp_ns();
                    f(raw);
                    n += 1;
                }
                None => {}
            }
            self.set_aside.clear();
        }
        while n < pass.budget {
            let Some(item) = self.events.next() else {
                return n;
            };
            let Some(raw) = raw_event::<T>(&item) else {
                continue;
            };
            if raw.stamp_ns() > pass.until_ns {
                self.set_aside.extend_from_slice(&item);
                return n;
            }
            last = raw.stamp_ns();
            f(raw);
            n += 1;
        }
        pass.more = true;
        pass.until_ns = pass.until_ns.min(last);
        n
    }

    pub(crate) fn stats(&self) -> FamilyStats {
        FamilyStats::from_slots(read_stats(&self.stats))
    }

    /// The ring buffer's fd, readable when events wait (for epoll/AsyncFd).
    pub(crate) fn ring_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.events.as_raw_fd()
    }
}

/// Attaches a family by trying `kinds` in order ([`attach_first`]), then
/// takes its ring buffer and stats: what every family's `attach` does.
pub(crate) fn attach_family(
    ebpf: &mut Ebpf,
    (family, hook): (&'static str, &'static str),
    (events_map, stats_map): (&'static str, &'static str),
    kinds: impl IntoIterator<Item = AttachType>,
    mut try_attach: impl FnMut(&mut Ebpf, AttachType) -> Result<(), String>,
) -> Result<(FamilyMaps, Attachment), ProbeError> {
    let (attach_type, refused) = attach_first(family, kinds, |kind| try_attach(ebpf, kind))?;
    let maps = FamilyMaps::take(ebpf, family, events_map, stats_map)?;
    Ok((
        maps,
        Attachment {
            family,
            hook,
            attach_type,
            refused,
        },
    ))
}

/// A program of the object, as its concrete type.
pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} is missing from the eBPF object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())
}

/// A tracepoint family's program, attached with one hook type: the object
/// names its programs `<prefix>_tp_btf`, `<prefix>_raw_tp` and
/// `<prefix>_tracepoint`; `what` names the family in the refusal.
pub(crate) fn attach_tracepoint(
    ebpf: &mut Ebpf,
    btf: &AttachBtf,
    kind: AttachType,
    (prefix, what): (&str, &str),
    (category, name): (&str, &str),
) -> Result<(), String> {
    use aya::programs::{BtfTracePoint, RawTracePoint, TracePoint};
    match kind {
        AttachType::TpBtf => {
            let btf = btf
                .get()
                .ok_or("the kernel's BTF could not be read by aya")?;
            let prog: &mut BtfTracePoint = program(ebpf, &format!("{prefix}_tp_btf"))?;
            prog.load(name, btf).map_err(|e| error_chain(&e))?;
            prog.attach().map_err(|e| error_chain(&e))?;
        }
        AttachType::RawTp => {
            let prog: &mut RawTracePoint = program(ebpf, &format!("{prefix}_raw_tp"))?;
            prog.load().map_err(|e| error_chain(&e))?;
            prog.attach(name).map_err(|e| error_chain(&e))?;
        }
        AttachType::Tracepoint => {
            crate::kernel::tracefs::ensure_mounted()?;
            let prog: &mut TracePoint = program(ebpf, &format!("{prefix}_tracepoint"))?;
            prog.load().map_err(|e| error_chain(&e))?;
            prog.attach(category, name).map_err(|e| error_chain(&e))?;
        }
        other => return Err(format!("{other} is not {what} hook")),
    }
    Ok(())
}

/// A NUL-padded kernel string (`comm`, a cgroup path) as text.
pub(crate) fn comm_str(comm: &[u8]) -> String {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

/// An error and its causes on one line: aya's outer errors rarely say why.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cur = c.source();
    }
    s
}

/// Sums a family's per-CPU stats array.
pub(crate) fn read_stats(
    map: &aya::maps::PerCpuArray<aya::maps::MapData, u64>,
) -> [u64; agent_common::stats::STAT_SLOTS as usize] {
    let mut out = [0u64; agent_common::stats::STAT_SLOTS as usize];
    for (slot, total) in out.iter_mut().enumerate() {
        if let Ok(values) = map.get(&(slot as u32), 0) {
            *total = values.iter().sum();
        }
    }
    out
}

/// A family's counters, as userspace reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FamilyStats {
    pub hits: u64,
    pub emitted: u64,
    pub lost: u64,
    pub read_errors: u64,
    pub filtered: u64,
}

impl FamilyStats {
    pub(crate) fn from_slots(s: [u64; agent_common::stats::STAT_SLOTS as usize]) -> FamilyStats {
        use agent_common::stats::*;
        let (emitted, lost, filtered) = (
            s[STAT_EMITTED as usize],
            s[STAT_LOST as usize],
            s[STAT_FILTERED as usize],
        );
        FamilyStats {
            // A family whose every path ends in one of these three leaves
            // its hits uncounted (one counter less on its hot path).
            hits: s[STAT_HITS as usize].max(emitted + lost + filtered),
            emitted,
            lost,
            read_errors: s[STAT_READ_ERRORS as usize],
            filtered,
        }
    }
}

#[cfg(test)]
mod tests {
    use agent_common::stats::*;

    use super::*;

    #[test]
    fn the_wakeup_threshold_is_a_power_of_two() {
        assert_eq!(power_of_two_floor(0), 0);
        assert_eq!(power_of_two_floor(1), 1);
        assert_eq!(power_of_two_floor(3000), 2048);
        assert_eq!(power_of_two_floor(64 << 10), 64 << 10);
    }

    #[test]
    fn hits_left_uncounted_are_the_sum_of_the_outcomes() {
        let mut s = [0u64; STAT_SLOTS as usize];
        s[STAT_EMITTED as usize] = 5;
        s[STAT_LOST as usize] = 2;
        s[STAT_FILTERED as usize] = 40;
        assert_eq!(FamilyStats::from_slots(s).hits, 47);
        // A family that counts its hits (some paths end in none of the
        // three) keeps its own count.
        s[STAT_HITS as usize] = 60;
        assert_eq!(FamilyStats::from_slots(s).hits, 60);
    }
}
