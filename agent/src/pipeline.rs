//! The event pipeline both `trace` and `agent` run: load the eBPF object,
//! attach every family, and turn what the kernel sends into attributed,
//! typed events.
//!
//! ```text
//! kernel ring buffers ──drain──▶ decode ──▶ attribute (metadata) ──▶ Vec<Event>
//! ```
//!
//! A new family registers here once: its probe is attached in [`Pipeline::start`]
//! and drained in [`Pipeline::next_batch`].

use std::{
    os::fd::RawFd,
    time::{Duration, Instant},
};

use tokio::io::{Interest, unix::AsyncFd};

use crate::kubeproxy::{self, RuleSource, Seen};
use crate::{
    events::Event,
    forensics::{Finding, Forensics, ForensicsStats},
    kernel::{cgroups::CgroupLayout, release_freed_memory},
    metadata::{Resolver, ResolverOptions, ResolverStats},
    probes::{
        self, AttachType, Attachment, FamilyStats, KernelOffsets, LoadOptions, ProbeError,
        cgroups::{CgroupOp, CgroupProbe},
        exits::{Exit, ExitProbe},
        net::NetProbe,
        oom::{OomKill, OomProbe},
        signals::{Signal, SignalProbe},
        throttle::ThrottleProbe,
    },
    throttle::ThrottleBook,
};

#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    pub load: LoadOptions,
    /// Force the exit probe's hook type (None: the best the kernel allows).
    pub exits_attach: Option<AttachType>,
    pub resolver: ResolverOptions,
    /// Attach the packet probes (netfilter links, kfree_skb) and read kube-proxy's rules.
    pub net: bool,
    /// The network namespace where kube-proxy's rules live (None: this process's).
    pub netns: Option<std::path::PathBuf>,
    /// Attach the CPU throttling probe (sched_switch, the hottest
    /// tracepoint: only for the consumers that want it) and read the
    /// containers' cpu.stat on every tick.
    pub throttle: bool,
}

/// Counters of one family, as exported.
#[derive(Clone, Debug)]
pub struct SourceStats {
    pub source: &'static str,
    pub stats: FamilyStats,
}

pub struct Pipeline {
    exits: ExitProbe,
    cgroups: Option<CgroupProbe>,
    signals: Option<SignalProbe>,
    oom: Option<OomProbe>,
    forensics: Forensics,
    net: Option<NetProbe>,
    rules: RuleSource,
    seen: Seen,
    throttle: Option<ThrottleProbe>,
    throttle_book: ThrottleBook,
    resolver: Resolver,
    attachments: Vec<Attachment>,
    /// Refused family attachments: (family, reason).
    pub unavailable: Vec<(&'static str, String)>,
    // Keeps every program attached; dropped last.
    _ebpf: aya::Ebpf,
}

impl Pipeline {
    /// Loads and attaches everything; only a family every other depends on
    /// (exits, today) failing is an error.
    pub async fn start(opts: &PipelineOptions) -> Result<Pipeline, ProbeError> {
        let offsets = KernelOffsets::from_sys_fs()?;
        let mut ebpf = probes::load_object(&offsets, &opts.load)?;
        let btf = probes::attach_btf();
        let mut unavailable = vec![];
        let mut attachments = vec![];
        // Attribution: cgroups are learned as they are created. Without this
        // probe, containers started from now on are shown as the host's.
        let cgroups = match CgroupProbe::attach(&mut ebpf, btf.as_ref(), &offsets.cgroups) {
            Ok(p) => {
                attachments.push(p.attachment.clone());
                Some(p)
            }
            Err(e) => {
                tracing::warn!(
                    "{e}: containers started from now on cannot be attributed to their pods"
                );
                unavailable.push((probes::cgroups::FAMILY, e.to_string()));
                None
            }
        };
        // Termination forensics: without signals, records lack the sender
        // and the SIGTERM → SIGKILL timeline; without OOM, OOM kills read as
        // SIGKILLs of unknown origin.
        let signals = match SignalProbe::attach(&mut ebpf, btf.as_ref()) {
            Ok(p) => {
                attachments.push(p.attachment.clone());
                Some(p)
            }
            Err(e) => {
                tracing::warn!("{e}: termination records will not name who sent a signal");
                unavailable.push((probes::signals::FAMILY, e.to_string()));
                None
            }
        };
        let oom = match OomProbe::attach(&mut ebpf, &offsets.oom) {
            Ok(p) => {
                attachments.push(p.attachment.clone());
                Some(p)
            }
            Err(e) => {
                tracing::warn!("{e}: OOM kills will show as SIGKILLs of unknown origin");
                unavailable.push((probes::oom::FAMILY, e.to_string()));
                None
            }
        };
        let exits = ExitProbe::attach(&mut ebpf, btf.as_ref(), opts.exits_attach)?;
        attachments.push(exits.attachment.clone());
        let net = if !opts.net {
            None
        } else if offsets.net.is_none() {
            let why =
                "this kernel's BTF lacks the conntrack or sk_buff fields the packet probes read"
                    .to_string();
            tracing::warn!("{why}");
            unavailable.push((probes::net::FAMILY_CONNS, why));
            None
        } else {
            match NetProbe::attach(
                &mut ebpf,
                btf.as_ref(),
                offsets.drop_reasons.clone(),
                opts.netns.as_deref(),
            ) {
                Ok(p) => {
                    attachments.extend(p.attachments.iter().cloned());
                    for (family, why) in &p.unavailable {
                        tracing::warn!("{family}: {why}");
                    }
                    unavailable.extend(p.unavailable.iter().cloned());
                    Some(p)
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    unavailable.push((probes::net::FAMILY_CONNS, e.to_string()));
                    None
                }
            }
        };
        let mut rules = RuleSource::new(opts.netns.as_deref());
        if net.is_some() {
            rules.refresh(true);
        }
        let throttle = if opts.throttle {
            match ThrottleProbe::attach(&mut ebpf, btf.as_ref(), &offsets.throttle, None) {
                Ok(p) => {
                    attachments.push(p.attachment.clone());
                    Some(p)
                }
                Err(e) => {
                    tracing::warn!("{e}: CPU throttling is read from cpu.stat only");
                    unavailable.push((probes::throttle::FAMILY, e.to_string()));
                    None
                }
            }
        } else {
            None
        };
        for a in &attachments {
            for (kind, why) in &a.refused {
                tracing::info!(
                    "{} could not use {kind} ({why}); using {}",
                    a.family,
                    a.attach_type
                );
            }
        }
        // BTF is only needed to attach: give its memory back to the system.
        drop(btf);
        release_freed_memory();
        let resolver = Resolver::new(&opts.resolver).await;
        let layout = CgroupLayout::current();
        let mut forensics = Forensics::new(&layout, opts.resolver.max_cgroups);
        if let Some(root) = layout.v2_root() {
            forensics.adopt_running(&resolver, root);
        }
        let mut pipeline = Pipeline {
            exits,
            cgroups,
            signals,
            oom,
            forensics,
            net,
            rules,
            seen: Seen::new(16_384, Duration::from_secs(120)),
            throttle,
            throttle_book: ThrottleBook::new(layout),
            resolver,
            attachments,
            unavailable,
            _ebpf: ebpf,
        };
        if pipeline.throttle.is_some() {
            // The cpu.stat baseline of every container, as the probe starts counting.
            pipeline.refresh_cpu_stats().await;
        }
        Ok(pipeline)
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The fds that become readable when a batch of events waits.
    pub fn ring_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.exits.ring_fd()];
        fds.extend(self.cgroups.as_ref().map(CgroupProbe::ring_fd));
        fds.extend(self.signals.as_ref().map(SignalProbe::ring_fd));
        fds.extend(self.oom.as_ref().map(OomProbe::ring_fd));
        fds.extend(self.net.iter().flat_map(NetProbe::ring_fds));
        fds.extend(self.throttle.as_ref().map(ThrottleProbe::ring_fd));
        fds
    }

    /// Everything the kernel sent since the last call, attributed, and what
    /// forensics concluded from it. cgroup creations are applied first (an
    /// exit may follow its container's creation closely), removals last.
    pub async fn next_batch(&mut self) -> Vec<Event> {
        let mut changes = vec![];
        if let Some(cg) = self.cgroups.as_mut() {
            cg.drain(|c| changes.push(c));
        }
        for c in &changes {
            match c.op {
                CgroupOp::Created => self.resolver.cgroup_created(c.id, &c.path),
                CgroupOp::FirstExec { tgid } => {
                    self.forensics.on_first_exec(&self.resolver, c.id, tgid)
                }
                CgroupOp::Removed => {}
            }
        }
        // In the kernel's order: the OOM killer marks its victim, then sends
        // SIGKILL, then the victim exits.
        let mut ooms: Vec<OomKill> = vec![];
        if let Some(p) = self.oom.as_mut() {
            p.drain(|o| ooms.push(o));
        }
        let mut signals: Vec<Signal> = vec![];
        if let Some(p) = self.signals.as_mut() {
            p.drain(|s| signals.push(s));
        }
        let mut exits: Vec<Exit> = vec![];
        self.exits.drain(|e| exits.push(e));

        for oom in ooms {
            self.forensics.on_oom(&self.resolver, oom);
        }
        let mut events = Vec::with_capacity(exits.len() + signals.len());
        for mut sig in signals {
            sig.sender.pod = self.resolver.identify(sig.sender.cgroup_id).await;
            sig.target.pod = self.resolver.identify(sig.target.cgroup_id).await;
            self.forensics.on_signal(&sig);
            events.push(Event::Signal(sig));
        }
        for mut exit in exits {
            exit.pod = self.resolver.identify(exit.cgroup_id).await;
            self.forensics.on_exit(&self.resolver, &exit);
            events.push(Event::Exit(exit));
        }
        if let Some(probe) = self.throttle.as_mut() {
            let mut throttles = vec![];
            probe.drain(|t| throttles.push(t));
            for mut t in throttles {
                t.pod = self.resolver.identify(t.cgroup_id).await;
                self.throttle_book.observe(&t);
                events.push(Event::Throttle(t));
            }
        }
        for c in &changes {
            if c.op == CgroupOp::Removed {
                self.resolver.cgroup_removed(c.id);
                self.forensics.on_removed(c.id);
            }
        }
        self.net_batch(&mut events).await;
        for f in self.forensics.take_findings(Instant::now()) {
            events.push(finding_event(f));
        }
        events
    }

    /// Everything still in the kernel and every finding forensics holds,
    /// without waiting for them to settle: at shutdown.
    pub async fn final_batch(&mut self) -> Vec<Event> {
        let mut events = self.next_batch().await;
        for f in self
            .forensics
            .take_findings(Instant::now() + Duration::from_secs(3600))
        {
            events.push(finding_event(f));
        }
        events
    }

    /// Whether forensics holds findings that a later call will release
    /// (the caller should not sleep long).
    pub fn has_pending(&self) -> bool {
        self.forensics.has_pending()
    }

    pub fn forensics_stats(&self) -> ForensicsStats {
        self.forensics.stats
    }

    /// New connections and drops, attributed to pods, Services and endpoints.
    async fn net_batch(&mut self, events: &mut Vec<Event>) {
        let Some(net) = self.net.as_mut() else { return };
        let (mut conns, mut drops) = (vec![], vec![]);
        net.drain_conns(|c| conns.push(c));
        net.drain_drops(|d| drops.push(d));
        if conns.is_empty() && drops.is_empty() {
            return;
        }
        self.rules.refresh(false);
        let resolver = &self.resolver;
        let pod_of = |ip| resolver.pod_by_ip(ip);
        let mut by_socket = vec![];
        for c in &conns {
            let conn = kubeproxy::connection(c, &self.rules.map, &pod_of);
            // No pod has the source address (the node's own: a hostNetwork
            // pod): the sending socket's cgroup names the container, below.
            if conn.pod.pod.is_none() && c.cgroup_id != 0 {
                by_socket.push((events.len(), c.cgroup_id));
            }
            events.push(Event::Connection(conn));
        }
        for d in &drops {
            let (drop, conn) = kubeproxy::drop_events(d, &self.rules.map, &pod_of);
            events.push(Event::Drop(drop));
            if let (Some(conn), Some(t)) = (conn, d.tuple)
                && self.seen.first(t)
            {
                events.push(Event::Connection(conn));
            }
        }
        for (i, cgroup_id) in by_socket {
            let pod = self.resolver.identify(cgroup_id).await;
            if let Some(Event::Connection(conn)) = events.get_mut(i) {
                conn.pod = pod;
            }
        }
    }

    /// Periodic upkeep (about once a second).
    pub async fn tick(&mut self) {
        self.resolver.tick().await;
        self.forensics.retry_adoption();
        self.forensics.gc(Instant::now());
        if self.net.is_some() {
            self.rules.refresh(false);
            self.seen.gc();
        }
        if self.throttle.is_some() {
            self.refresh_cpu_stats().await;
        }
    }

    /// Reads every live container's cpu.stat into the throttle book.
    pub async fn refresh_cpu_stats(&mut self) {
        let mut containers = vec![];
        for (id, path) in self.resolver.live_container_cgroups() {
            let pod = self.resolver.identify(id).await;
            containers.push((id, path, pod));
        }
        self.throttle_book.refresh(&containers);
        self.throttle_book.forget_gone();
    }

    /// Per-container throttling, measured and from cpu.stat.
    pub fn throttle_book(&self) -> &ThrottleBook {
        &self.throttle_book
    }

    pub fn source_stats(&self) -> Vec<SourceStats> {
        let mut out = vec![SourceStats {
            source: probes::exits::FAMILY,
            stats: self.exits.stats(),
        }];
        if let Some(c) = &self.cgroups {
            out.push(SourceStats {
                source: probes::cgroups::FAMILY,
                stats: c.stats(),
            });
        }
        if let Some(p) = &self.signals {
            out.push(SourceStats {
                source: probes::signals::FAMILY,
                stats: p.stats(),
            });
        }
        if let Some(p) = &self.oom {
            out.push(SourceStats {
                source: probes::oom::FAMILY,
                stats: p.stats(),
            });
        }
        if let Some(n) = &self.net {
            out.extend(
                n.stats()
                    .into_iter()
                    .map(|(source, stats)| SourceStats { source, stats }),
            );
        }
        if let Some(t) = &self.throttle {
            out.push(SourceStats {
                source: probes::throttle::FAMILY,
                stats: t.stats(),
            });
        }
        out
    }

    /// Failed reads of kube-proxy's rules.
    pub fn rule_errors(&self) -> u64 {
        self.rules.errors
    }

    pub fn resolver_stats(&self) -> ResolverStats {
        self.resolver.stats()
    }

    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// Whether attribution has heard from CRI at least once (or runs without it).
    pub fn metadata_synced(&self) -> bool {
        self.resolver.synced()
    }
}

fn finding_event(f: Finding) -> Event {
    match f {
        Finding::Termination(t) => Event::Termination(t),
        Finding::BackgroundDeath(d) => Event::BackgroundDeath(*d),
        Finding::Oom(o) => Event::Oom(*o),
    }
}

struct RingFd(RawFd);
impl std::os::fd::AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The pipeline's ring buffers, registered with the async runtime: wakes
/// when any of them has a batch waiting (or an OOM, which always wakes).
pub struct Rings(Vec<AsyncFd<RingFd>>);

impl Rings {
    /// The caller must drop `Rings` before the pipeline, which owns the fds.
    pub fn register(pipeline: &Pipeline) -> std::io::Result<Rings> {
        pipeline
            .ring_fds()
            .into_iter()
            // SAFETY: the fds stay open while `Rings` lives: the pipeline
            // owns them and the caller drops `Rings` first.
            .map(|fd| unsafe { AsyncFd::register_with_interest(RingFd(fd), Interest::READABLE) })
            .collect::<Result<Vec<_>, _>>()
            .map(Rings)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    pub async fn readable(&self) {
        let waits = self.0.iter().map(|r| Box::pin(r.readable()));
        if let (Ok(mut guard), _, _) = futures_util::future::select_all(waits).await {
            guard.clear_ready();
        }
    }
}

/// How long a batch may wait in the kernel before it is read: events are
/// submitted without a wakeup until a batch is waiting (agent-ebpf's ringbuf.rs).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(100);
