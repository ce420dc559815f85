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
    },
};

#[derive(Clone, Debug, Default)]
pub struct PipelineOptions {
    pub load: LoadOptions,
    /// Force the exit probe's hook type (None: the best the kernel allows).
    pub exits_attach: Option<AttachType>,
    pub resolver: ResolverOptions,
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
        Ok(Pipeline {
            exits,
            cgroups,
            resolver,
            attachments,
            unavailable,
            _ebpf: ebpf,
        })
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The fds that become readable when a batch of events waits.
    pub fn ring_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.exits.ring_fd()];
        fds.extend(self.cgroups.as_ref().map(CgroupProbe::ring_fd));
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
        events
    }

    /// Periodic upkeep (about once a second).
    pub async fn tick(&mut self) {
        self.resolver.tick().await;
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
