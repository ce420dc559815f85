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

use std::{os::fd::RawFd, time::Duration};

use crate::{
    events::Event,
    kernel::release_freed_memory,
    metadata::{Resolver, ResolverOptions, ResolverStats},
    probes::{
        self, AttachType, Attachment, FamilyStats, KernelOffsets, LoadOptions, ProbeError,
        cgroups::CgroupProbe,
        exits::{Exit, ExitProbe},
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
        let exits = ExitProbe::attach(&mut ebpf, btf.as_ref(), opts.exits_attach)?;
        attachments.push(exits.attachment.clone());
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
        let mut pipeline = Pipeline {
            exits,
            cgroups,
            throttle,
            throttle_book: ThrottleBook::new(crate::kernel::cgroups::CgroupLayout::current()),
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
        fds.extend(self.throttle.as_ref().map(ThrottleProbe::ring_fd));
        fds
    }

    /// Everything the kernel sent since the last call, attributed. cgroup
    /// changes are applied first: an exit may follow its container's creation closely.
    pub async fn next_batch(&mut self) -> Vec<Event> {
        if let Some(cg) = self.cgroups.as_mut() {
            let resolver = &mut self.resolver;
            cg.drain(|c| {
                if c.created {
                    resolver.cgroup_created(c.id, &c.path);
                } else {
                    resolver.cgroup_removed(c.id);
                }
            });
        }
        let mut exits: Vec<Exit> = vec![];
        self.exits.drain(|e| exits.push(e));
        let mut events = Vec::with_capacity(exits.len());
        for mut exit in exits {
            exit.pod = self.resolver.identify(exit.cgroup_id).await;
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
        events
    }

    /// Periodic upkeep (about once a second).
    pub async fn tick(&mut self) {
        self.resolver.tick().await;
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
        if let Some(t) = &self.throttle {
            out.push(SourceStats {
                source: probes::throttle::FAMILY,
                stats: t.stats(),
            });
        }
        out
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

/// How long a batch may wait in the kernel before it is read: events are
/// submitted without a wakeup until a batch is waiting (agent-ebpf's ringbuf.rs).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(100);
