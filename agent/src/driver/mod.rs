//! The driver: the one data path `agent`, `trace` and `top` share.
//!
//! ```text
//!            ┌──────────── drain thread (owns the eBPF object and every ring) ───────────┐
//! kernel ──▶ │ poll rings ─▶ drain ─▶ decode ─▶ hold for names? ─▶ attribute ─▶ forensics │ ──▶ broadcast
//!            └──────────────▲───────────────────────────────────────────────────────────┘     (consumers)
//!                           │ inputs (never waited for): CRI names, Service map,
//!                           │ cgroupfs scans, adoptions
//!              deps tasks: cri, rules, cgroupfs (each with its deadline)
//! ```
//!
//! The drain thread performs no I/O but the rings' and takes no lock that
//! anything holds across I/O: what it needs from the outside arrives as
//! messages it picks up between drains, and what it produces goes out on a
//! broadcast channel whose slow readers lose events (counted) rather than
//! slowing it. Events of a container CRI has not named yet are held (in
//! order, draining on) until CRI names it, answers without it, or
//! [`DriverOptions::name_wait`] passes. Owning the object on its own thread
//! also means no caller can drop the rings in the wrong order.

mod batch;

use std::{
    collections::{HashMap, VecDeque},
    os::fd::RawFd,
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use axum::body::Bytes;
use serde::Serialize;
use tokio::sync::{Notify, broadcast, watch};

use self::batch::RawBatch;
use crate::{
    events::Event,
    families::Kernel,
    forensics::{Forensics, ForensicsStats},
    kernel::{cgroups::CgroupLayout, clock, release_freed_memory},
    metadata::{Names, PodIdentity, Resolver, ResolverOptions, ResolverStats},
    net::{DyingEndpoints, Seen, ServiceMap},
    probes::{
        self, AttachType, Attachment, FamilyStats, KernelOffsets, LoadOptions, Pass, ProbeError,
        cgroups::CgroupProbe, exits::ExitProbe, net::NetProbe, oom::OomProbe, signals::SignalProbe,
        throttle::ThrottleProbe,
    },
};

/// How long a batch may wait in the kernel before it is read: events are
/// submitted without a wakeup until a batch is waiting (agent-ebpf's ringbuf.rs).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// Events a consumer may fall behind by before it loses the oldest (each
/// held event costs a few hundred bytes while any reader still lags).
pub const EVENT_QUEUE: usize = 16_384;

/// Most events held back waiting for names; beyond it the oldest go out
/// unnamed (counted). A held signal is 384 bytes: this bounds the hold at
/// about 12 MiB (plus the pass that crosses it, at most 4,096 records a
/// ring), where 200,000 allowed 77 MiB, above the DaemonSet's limit, to a
/// storm in a container in its first seconds.
const HOLD_CAP: usize = 32_768;

/// Passes in a row a flush waits for the rings to empty.
const CATCH_UP_PASSES: usize = 64;

/// How long the stop reads what the rings still hold before it publishes
/// the records forensics was settling (the agent's whole stop: 800 ms).
const STOP_CATCH_UP: Duration = Duration::from_millis(300);

#[derive(Clone, Debug)]
pub struct DriverOptions {
    pub load: LoadOptions,
    /// Force the exit probe's hook type (None: the best the kernel allows).
    pub exits_attach: Option<AttachType>,
    pub resolver: ResolverOptions,
    /// Attach the signal probe (termination forensics, the signals view).
    pub signals: bool,
    /// Attach the OOM probe (termination forensics, the oom view).
    pub oom: bool,
    /// Attach the packet probes (netfilter links, kfree_skb).
    pub net: bool,
    /// The network namespace where kube-proxy's rules live (None: this process's).
    pub netns: Option<PathBuf>,
    /// Attach the CPU throttling probe (sched_switch, the hottest
    /// tracepoint: only for the consumers that want it).
    pub throttle: bool,
    /// How long events of a container CRI has not named wait for its name.
    pub name_wait: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            load: LoadOptions::default(),
            exits_attach: None,
            resolver: ResolverOptions::default(),
            signals: true,
            oom: true,
            net: false,
            netns: None,
            throttle: false,
            name_wait: Duration::from_secs(2),
        }
    }
}

/// Counters of one kernel family, as exported.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStats {
    pub source: &'static str,
    pub stats: FamilyStats,
}

/// An event as every consumer receives it: serialized at most once,
/// whoever asks first (every `/api/v1/events` reader shares the bytes).
#[derive(Debug)]
pub struct Published {
    pub event: Event,
    json: OnceLock<Bytes>,
}

impl Published {
    pub fn new(event: Event) -> Published {
        Published {
            event,
            json: OnceLock::new(),
        }
    }

    /// The event's JSON line (with its newline).
    pub fn json_line(&self) -> &Bytes {
        self.json.get_or_init(|| {
            let mut v = Vec::with_capacity(256);
            // Serializing plain structs of strings and numbers cannot fail.
            let _ = self.event.write_json_line(&mut v);
            Bytes::from(v)
        })
    }
}

/// What the drain thread publishes about itself about once a second.
#[derive(Clone, Debug, Default)]
pub struct DriverStatus {
    pub sources: Vec<SourceStats>,
    pub resolver: ResolverStats,
    pub forensics: ForensicsStats,
    /// Containers whose cgroup exists now, attributed: (v2 id, path, who).
    pub live_containers: Arc<Vec<(u64, Arc<str>, PodIdentity)>>,
    /// The names snapshot in use (liveness of pods for series retention).
    pub names: Arc<Names>,
    /// Containers the runtime lists and that have not gone.
    pub tracked_containers: usize,
    /// Events published since start.
    pub published: u64,
    /// Events held back waiting for names now, and those that waited out
    /// [`DriverOptions::name_wait`] and went out unnamed.
    pub held: usize,
    pub names_waited_out: u64,
    /// How long the oldest event waited between the drain and its
    /// publication in the last second (names, ordering): the drain lag.
    pub drain_lag: Duration,
    /// Whether attribution has heard from CRI at least once (or runs without it).
    pub metadata_synced: bool,
    /// When the drain thread last went round its loop.
    pub heartbeat: Option<Instant>,
    /// Entries in each table the drain thread keeps, by name.
    pub tables: Vec<(&'static str, usize)>,
}

/// What the dependency tasks hand the drain thread.
pub enum Input {
    Names(Arc<Names>),
    Services(Arc<ServiceMap>),
    /// A cgroupfs scan that started at the instant given.
    CgroupScan(Vec<(u64, String)>, Instant),
    /// Drain every ring now and publish what is there (until the rings are
    /// empty, or 64 passes in a row under a storm that does not end), then
    /// answer: a view that must see everything up to an instant (`top`'s
    /// window) asks.
    Flush(mpsc::Sender<()>),
    /// A look for the main process of a container found at start-up.
    Adoption {
        cgroup_id: u64,
        main: Option<u32>,
        dir_exists: bool,
    },
}

/// The driver's side that tasks hold: send inputs, read the status,
/// subscribe to events. Cloneable; holds no part of the probes.
#[derive(Clone)]
pub struct DriverLink {
    pub inputs: mpsc::Sender<Input>,
    pub status: watch::Receiver<Arc<DriverStatus>>,
    events: broadcast::Sender<Arc<Published>>,
    unadopted: Arc<std::sync::Mutex<Vec<(u64, PathBuf)>>>,
}

impl DriverLink {
    /// A link with no drain thread behind it (nothing is ever published):
    /// for exercising consumers, e.g. the HTTP router under a fuzzer.
    pub fn detached() -> DriverLink {
        let (inputs, _) = mpsc::channel();
        let (_, status) = watch::channel(Arc::new(DriverStatus::default()));
        DriverLink {
            inputs,
            status,
            events: broadcast::channel(16).0,
            unadopted: Default::default(),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.events.subscribe()
    }

    /// Containers found at start-up whose main process is still sought.
    pub fn unadopted(&self) -> Vec<(u64, PathBuf)> {
        self.unadopted.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits (at most `deadline`) for the drain thread's first status, which
    /// lists the containers that exist: baselines are taken from it.
    pub async fn first_status(&self, deadline: Duration) {
        let mut status = self.status.clone();
        let first = async {
            while status.borrow_and_update().heartbeat.is_none() {
                if status.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(deadline, first).await;
    }

    /// Hands the drain thread an input; false once it has stopped.
    pub fn send(&self, input: Input) -> bool {
        self.inputs.send(input).is_ok()
    }
}

/// A handle on the drain thread; dropping it stops the thread.
pub struct Driver {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
    inputs: mpsc::Sender<Input>,
    events: broadcast::Sender<Arc<Published>>,
    status: watch::Receiver<Arc<DriverStatus>>,
    /// Signalled when the drain thread meets a container CRI has not named.
    pub names_wanted: Arc<Notify>,
    pub attachments: Vec<Attachment>,
    /// Refused family attachments: (family, reason).
    pub unavailable: Vec<(&'static str, String)>,
    /// Containers found at start-up whose main process is not known yet.
    unadopted: Arc<std::sync::Mutex<Vec<(u64, PathBuf)>>>,
    /// Events published (also in the status; here for a precise count at stop).
    published: Arc<AtomicU64>,
}

/// The probes, owned by the drain thread.
struct Probes {
    exits: ExitProbe,
    cgroups: Option<CgroupProbe>,
    signals: Option<SignalProbe>,
    oom: Option<OomProbe>,
    net: Option<NetProbe>,
    throttle: Option<ThrottleProbe>,
    // Keeps every program attached; dropped last (fields drop in order).
    _ebpf: aya::Ebpf,
}

impl Driver {
    /// Loads and attaches everything (start-up: this may read BTF, tracefs
    /// and cgroupfs), then starts the drain thread. Only a family every
    /// other depends on (exits, today) failing is an error.
    pub fn start(opts: &DriverOptions) -> Result<Driver, ProbeError> {
        // Start-up memory by stage, read only when debug logging asks.
        let mem = || tracing::enabled!(tracing::Level::DEBUG).then(crate::kernel::resident_kib);
        let before = mem();
        let offsets = KernelOffsets::from_sys_fs()?;
        // The parse's small allocations would otherwise stay resident (2.4
        // MiB measured) under aya's own parse of the same BTF, which comes
        // next and sets the start-up peak.
        release_freed_memory();
        let after_offsets = mem();
        let mut ebpf = probes::load_object(&offsets, &opts.load)?;
        let after_load = mem();
        tracing::debug!(
            "start-up memory (RSS/peak KiB): before {before:?}, offsets {after_offsets:?}, object loaded {after_load:?}"
        );
        let btf = probes::attach_btf();
        let mut unavailable = vec![];
        let mut attachments = vec![];
        let mut report = Report {
            attachments: &mut attachments,
            unavailable: &mut unavailable,
        };
        // Attribution: cgroups are learned as they are created. Without this
        // probe, containers started from now on are shown as the host's.
        let cgroups = report.optional(
            CgroupProbe::attach(&mut ebpf, &btf, &offsets.cgroups, None)
                .map(|p| (p.attachment.clone(), p)),
            Kernel::Cgroups,
            "containers started from now on cannot be attributed to their pods",
        );
        // Termination forensics: without signals, records lack the sender
        // and the SIGTERM → SIGKILL timeline; without OOM, OOM kills read as
        // SIGKILLs of unknown origin.
        let signals = if opts.signals {
            report.optional(
                SignalProbe::attach(&mut ebpf, &btf).map(|p| (p.attachment.clone(), p)),
                Kernel::Signals,
                "termination records will not name who sent a signal",
            )
        } else {
            None
        };
        let oom = if opts.oom {
            report.optional(
                OomProbe::attach(&mut ebpf, &offsets.oom).map(|p| (p.attachment.clone(), p)),
                Kernel::Oom,
                "OOM kills will show as SIGKILLs of unknown origin",
            )
        } else {
            None
        };
        let throttle = if opts.throttle {
            report.optional(
                ThrottleProbe::attach(&mut ebpf, &btf, &offsets.throttle, None)
                    .map(|p| (p.attachment.clone(), p)),
                Kernel::Throttle,
                "CPU throttling is read from cpu.stat only",
            )
        } else {
            None
        };
        let exits = ExitProbe::attach(&mut ebpf, &btf, opts.exits_attach)?;
        attachments.push(exits.attachment.clone());
        let net = if !opts.net {
            None
        } else if offsets.net.is_none() {
            let why =
                "this kernel's BTF lacks the conntrack or sk_buff fields the packet probes read"
                    .to_string();
            tracing::warn!("{why}");
            unavailable.push((Kernel::Netfilter.name(), why));
            None
        } else {
            match NetProbe::attach(
                &mut ebpf,
                &btf,
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
                    unavailable.push((Kernel::Netfilter.name(), e.to_string()));
                    None
                }
            }
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
        let aya_parsed_btf = btf.parsed();
        drop(btf);
        release_freed_memory();
        tracing::debug!(
            "start-up memory (RSS/peak KiB): attached {:?} (aya parsed the kernel's BTF for a fallback hook: {aya_parsed_btf})",
            mem()
        );
        let resolver = Resolver::new(&opts.resolver);
        let layout = CgroupLayout::current();
        let mut forensics = Forensics::new(&layout, opts.resolver.max_cgroups);
        if let Some(root) = layout.v2_root() {
            forensics.adopt_running(&resolver, root);
        }
        let probes = Probes {
            exits,
            cgroups,
            signals,
            oom,
            net,
            throttle,
            _ebpf: ebpf,
        };
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let (inputs_tx, inputs_rx) = mpsc::channel();
        let initial = DriverStatus {
            metadata_synced: resolver.synced(),
            ..Default::default()
        };
        let (status_tx, status) = watch::channel(Arc::new(initial));
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = mpsc::channel();
        let names_wanted = Arc::new(Notify::new());
        let unadopted = Arc::new(std::sync::Mutex::new(forensics.unadopted()));
        let published = Arc::new(AtomicU64::new(0));
        let mut drain = Drain {
            probes,
            resolver,
            forensics,
            services: Arc::new(ServiceMap::default()),
            seen: Seen::new(16_384, Duration::from_secs(120)),
            dying: DyingEndpoints::new(4096, Duration::from_secs(600)),
            held: VecDeque::new(),
            held_events: 0,
            names_waited_out: 0,
            unknown_to_cri: HashMap::new(),
            name_wait: opts.name_wait,
            events: events.clone(),
            inputs: inputs_rx,
            status: status_tx,
            names_wanted: names_wanted.clone(),
            stop: stop.clone(),
            unadopted: unadopted.clone(),
            published: published.clone(),
            max_lag: Duration::ZERO,
            flushes: vec![],
        };
        let thread = std::thread::Builder::new()
            .name("podscope-drain".into())
            .spawn(move || {
                drain.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| ProbeError::Load(format!("cannot start the drain thread: {e}")))?;
        Ok(Driver {
            thread: Some(thread),
            stop,
            done,
            inputs: inputs_tx,
            events,
            status,
            names_wanted,
            attachments,
            unavailable,
            unadopted,
            published,
        })
    }

    /// A new reader of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.events.subscribe()
    }

    /// The sender side, for consumers that re-publish (e.g. a test).
    pub fn events(&self) -> &broadcast::Sender<Arc<Published>> {
        &self.events
    }

    /// Where dependency tasks send what the drain thread needs.
    pub fn inputs(&self) -> mpsc::Sender<Input> {
        self.inputs.clone()
    }

    /// The drain thread's latest status.
    pub fn status(&self) -> watch::Receiver<Arc<DriverStatus>> {
        self.status.clone()
    }

    /// What a dependency task or consumer needs of the driver.
    pub fn link(&self) -> DriverLink {
        DriverLink {
            inputs: self.inputs.clone(),
            status: self.status.clone(),
            events: self.events.clone(),
            unadopted: self.unadopted.clone(),
        }
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Stops the drain thread after a last drain that publishes everything
    /// the kernel still holds and every finding forensics was holding back,
    /// waiting at most `deadline`; false when it did not finish in time (the
    /// process may exit anyway: the kernel detaches the programs).
    pub fn stop(mut self, deadline: Duration) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        let finished = self.done.recv_timeout(deadline).is_ok();
        if finished && let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        finished
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Where attach results go at start-up.
struct Report<'a> {
    attachments: &'a mut Vec<Attachment>,
    unavailable: &'a mut Vec<(&'static str, String)>,
}

impl Report<'_> {
    /// An optional family: attached, or refused with what that costs.
    fn optional<P>(
        &mut self,
        r: Result<(Attachment, P), ProbeError>,
        family: Kernel,
        loses: &str,
    ) -> Option<P> {
        match r {
            Ok((a, p)) => {
                self.attachments.push(a);
                Some(p)
            }
            Err(e) => {
                tracing::warn!("{e}: {loses}");
                self.unavailable.push((family.name(), e.to_string()));
                None
            }
        }
    }
}

/// A drained batch waiting for names.
struct Held {
    at: Instant,
    batch: RawBatch,
    /// Containers it waits for.
    waiting: Vec<String>,
}

/// The drain thread's state.
struct Drain {
    probes: Probes,
    resolver: Resolver,
    forensics: Forensics,
    services: Arc<ServiceMap>,
    seen: Seen,
    /// Pods whose containers got SIGTERM: connections still DNATed to them.
    dying: DyingEndpoints,
    held: VecDeque<Held>,
    held_events: usize,
    names_waited_out: u64,
    /// Containers a CRI listing made after their events did not know (not
    /// Kubernetes' own, or gone): not waited for again until the time given.
    unknown_to_cri: HashMap<String, Instant>,
    name_wait: Duration,
    events: broadcast::Sender<Arc<Published>>,
    inputs: mpsc::Receiver<Input>,
    status: watch::Sender<Arc<DriverStatus>>,
    names_wanted: Arc<Notify>,
    stop: Arc<AtomicBool>,
    unadopted: Arc<std::sync::Mutex<Vec<(u64, PathBuf)>>>,
    published: Arc<AtomicU64>,
    max_lag: Duration,
    /// Flushes asked for, answered once a pass leaves the rings empty.
    flushes: Vec<mpsc::Sender<()>>,
}

impl Drain {
    fn run(&mut self) {
        let fds = self.ring_fds();
        // What exists now, at once: consumers take their baselines from it.
        self.publish_status();
        let mut next_tick = Instant::now();
        // Passes in a row that left records in a ring.
        let mut behind = 0;
        let mut stop_by = None;
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            if stopping && stop_by.is_none() {
                stop_by = Some(Instant::now() + STOP_CATCH_UP);
            }
            if !stopping && behind == 0 {
                wait_readable(&fds, DRAIN_INTERVAL);
            }
            self.take_inputs();
            let now = Instant::now();
            let (batch, more) = self.drain(now, stopping);
            behind = if more { behind + 1 } else { 0 };
            if !batch.is_empty() {
                self.hold(batch, now);
            }
            self.release(now, stopping);
            // A flush asked for everything up to now, and stopping reads
            // what the rings hold: both wait for the rings to empty, up to
            // a bound in case a storm never ends (stopping by time: the
            // callers give the whole stop less than a second).
            if behind == 0 || behind >= CATCH_UP_PASSES {
                for ack in self.flushes.drain(..) {
                    let _ = ack.send(());
                }
            }
            if stopping && (behind == 0 || stop_by.is_some_and(|t| now >= t)) {
                let far = Instant::now() + Duration::from_secs(3600);
                self.publish_findings(far);
                self.publish_status();
                return;
            }
            if stopping {
                continue;
            }
            self.publish_findings(now);
            if now >= next_tick {
                next_tick = now + Duration::from_secs(1);
                self.tick(now);
            }
        }
    }

    fn ring_fds(&self) -> Vec<RawFd> {
        let p = &self.probes;
        let mut fds = vec![p.exits.ring_fd()];
        fds.extend(p.cgroups.as_ref().map(CgroupProbe::ring_fd));
        fds.extend(p.signals.as_ref().map(SignalProbe::ring_fd));
        fds.extend(p.oom.as_ref().map(OomProbe::ring_fd));
        fds.extend(p.net.iter().flat_map(NetProbe::ring_fds));
        fds.extend(p.throttle.as_ref().map(ThrottleProbe::ring_fd));
        fds
    }

    fn take_inputs(&mut self) {
        while let Ok(input) = self.inputs.try_recv() {
            match input {
                Input::Flush(ack) => self.flushes.push(ack),
                Input::Names(n) => self.resolver.set_names(n),
                Input::Services(s) => self.services = s,
                Input::CgroupScan(found, at) => self.resolver.reconcile_cgroups(&found, at),
                Input::Adoption {
                    cgroup_id,
                    main,
                    dir_exists,
                } => {
                    self.forensics.adoption_tried(cgroup_id, main, dir_exists);
                    if let Ok(mut u) = self.unadopted.lock() {
                        *u = self.forensics.unadopted();
                    }
                }
            }
        }
    }

    /// What the kernel sent since the last pass, at most
    /// [`probes::PASS_BUDGET`] records a ring and, of the ordered families,
    /// nothing stamped after the pass began (`more`: a ring had more than
    /// its budget). cgroup creations are applied at once (the
    /// directory may be gone by the time the batch is released); everything
    /// else waits for its turn.
    fn drain(&mut self, now: Instant, stopping: bool) -> (RawBatch, bool) {
        let mut b = RawBatch::new(now);
        // At stop no pass follows: take what is there, whenever stamped.
        let mut pass = if stopping {
            Pass::unstamped(probes::PASS_BUDGET)
        } else {
            Pass::new(probes::PASS_BUDGET)
        };
        let p = &mut self.probes;
        if let Some(cg) = p.cgroups.as_mut() {
            cg.drain_within(&mut pass, |c| b.cgroups.push(c));
        }
        for c in &b.cgroups {
            if c.op == probes::cgroups::CgroupOp::Created {
                self.resolver.cgroup_created(c.id, &c.path);
            }
        }
        // In the kernel's order: the OOM killer marks its victim, then sends
        // SIGKILL, then the victim exits.
        if let Some(o) = p.oom.as_mut() {
            o.drain_within(&mut pass, |x| b.ooms.push(x));
        }
        if let Some(s) = p.signals.as_mut() {
            s.drain_within(&mut pass, |x| b.signals.push(x));
        }
        p.exits.drain_within(&mut pass, |x| b.exits.push(x));
        if let Some(t) = p.throttle.as_mut() {
            t.drain_within(&mut pass, |x| b.throttles.push(x));
        }
        if let Some(n) = p.net.as_mut() {
            n.drain_conns(&mut pass, |x| b.conns.push(x));
            n.drain_drops(&mut pass, |x| b.drops.push(x));
        }
        (b, pass.more)
    }

    /// Queues a batch behind those already held (order is kept), noting the
    /// containers CRI has not named; asks the CRI task for a listing.
    fn hold(&mut self, batch: RawBatch, now: Instant) {
        self.unknown_to_cri.retain(|_, until| *until > now);
        let mut waiting: Vec<String> = batch
            .cgroup_ids()
            .filter_map(|id| self.resolver.lacks_names(id).map(str::to_string))
            .filter(|c| !self.unknown_to_cri.contains_key(c))
            .collect();
        waiting.sort();
        waiting.dedup();
        if !waiting.is_empty() {
            self.names_wanted.notify_one();
        }
        self.held_events += batch.len();
        self.held.push_back(Held {
            at: now,
            batch,
            waiting,
        });
    }

    /// Processes and publishes the held batches whose names are there (or
    /// that waited long enough), oldest first.
    fn release(&mut self, now: Instant, all: bool) {
        while let Some(front) = self.held.front_mut() {
            let names = self.resolver.names().clone();
            front.waiting.retain(|c| !names.knows(c));
            let listed_after = names.listed_at.is_some_and(|t| t > front.at);
            let expired = now.duration_since(front.at) >= self.name_wait;
            let give_up = all
                || front.waiting.is_empty()
                || listed_after
                || expired
                || self.held_events > HOLD_CAP
                || self.resolver.names_unavailable();
            if !give_up {
                break;
            }
            let Some(h) = self.held.pop_front() else {
                break;
            };
            if !h.waiting.is_empty() {
                // CRI answered without them, or too slowly: go out unnamed,
                // and do not hold these containers again for a while.
                self.names_waited_out += h.batch.len() as u64;
                for c in h.waiting {
                    self.unknown_to_cri.insert(c, now + Duration::from_secs(30));
                }
            }
            self.held_events -= h.batch.len();
            self.max_lag = self.max_lag.max(now.duration_since(h.at));
            let events = batch::process(
                h.batch,
                &mut self.resolver,
                &mut self.forensics,
                &self.services,
                &mut self.seen,
                &mut self.dying,
            );
            for e in events {
                self.publish(e);
            }
        }
    }

    fn publish(&self, e: Event) {
        self.published.fetch_add(1, Ordering::Relaxed);
        // No reader is not an error; a slow reader lags and counts its loss.
        let _ = self.events.send(Arc::new(Published::new(e)));
    }

    fn publish_findings(&mut self, now: Instant) {
        let events = batch::findings(&mut self.forensics, &self.resolver, &mut self.dying, now);
        // Records wait for the runtime's report of the end: a runtime
        // without an event stream lists only every few seconds.
        if self.forensics.runtime.began_waiting() {
            self.names_wanted.notify_one();
        }
        for e in events {
            self.publish(e);
        }
    }

    /// Once a second: expiry, the clock's offset, and the status.
    fn tick(&mut self, now: Instant) {
        clock::resync();
        self.forensics.gc(now);
        self.resolver.gc(now);
        self.seen.gc();
        self.dying.gc(std::time::SystemTime::now());
        self.publish_status();
        self.max_lag = Duration::ZERO;
    }

    fn publish_status(&mut self) {
        let p = &self.probes;
        let mut sources = vec![SourceStats {
            source: Kernel::Exits.name(),
            stats: p.exits.stats(),
        }];
        let mut add = |k: Kernel, s: Option<FamilyStats>| {
            if let Some(stats) = s {
                sources.push(SourceStats {
                    source: k.name(),
                    stats,
                });
            }
        };
        add(Kernel::Cgroups, p.cgroups.as_ref().map(CgroupProbe::stats));
        add(Kernel::Signals, p.signals.as_ref().map(SignalProbe::stats));
        add(Kernel::Oom, p.oom.as_ref().map(OomProbe::stats));
        add(
            Kernel::Throttle,
            p.throttle.as_ref().map(ThrottleProbe::stats),
        );
        if let Some(n) = &p.net {
            sources.extend(
                n.stats()
                    .into_iter()
                    .map(|(source, stats)| SourceStats { source, stats }),
            );
        }
        let live: Vec<(u64, Arc<str>, PodIdentity)> = self
            .resolver
            .live_container_cgroups()
            .into_iter()
            .map(|(id, path)| {
                let pod = self.resolver.identify(id);
                (id, path, pod)
            })
            .collect();
        let names = self.resolver.names().clone();
        let mut tables = vec![];
        self.resolver.tables(&mut tables);
        self.forensics.tables(&mut tables);
        let (seen, seen_order) = self.seen.entries();
        tables.extend([
            ("held_batches", self.held.len()),
            ("unknown_to_cri", self.unknown_to_cri.len()),
            ("connections_seen", seen),
            ("connections_seen_order", seen_order),
            ("dying_pods", self.dying.len()),
        ]);
        let status = DriverStatus {
            sources,
            resolver: self.resolver.stats(),
            forensics: self.forensics.stats,
            live_containers: Arc::new(live),
            tracked_containers: names.live_containers(),
            names,
            published: self.published.load(Ordering::Relaxed),
            held: self.held_events,
            names_waited_out: self.names_waited_out,
            drain_lag: self.max_lag,
            metadata_synced: self.resolver.synced(),
            heartbeat: Some(Instant::now()),
            tables,
        };
        self.status.send_replace(Arc::new(status));
    }
}

/// Waits until a ring has data or `timeout` passes (poll(2) on the ring fds:
/// the only blocking call of the drain thread).
fn wait_readable(fds: &[RawFd], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of pollfd for its length; the fds are
    // the rings', open for as long as the drain thread owns the probes.
    unsafe {
        libc::poll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            timeout.as_millis() as libc::c_int,
        );
    }
}
