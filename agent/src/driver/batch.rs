//! One drained batch, and its processing on the drain thread: attribution
//! from memory, termination forensics, and the packet paths' Service names.

use std::time::Instant;

use crate::{
    events::Event,
    forensics::{Finding, Forensics},
    metadata::Resolver,
    net::{self, DyingEndpoints, Seen, ServiceMap},
    probes::{
        cgroups::{CgroupChange, CgroupOp},
        exits::Exit,
        net::{RawConn, RawDrop},
        oom::OomKill,
        signals::Signal,
        throttle::Throttle,
    },
};

/// What one drain of every ring returned, in the kernel's order per family.
pub struct RawBatch {
    pub cgroups: Vec<CgroupChange>,
    pub ooms: Vec<OomKill>,
    pub signals: Vec<Signal>,
    pub exits: Vec<Exit>,
    pub throttles: Vec<Throttle>,
    pub conns: Vec<RawConn>,
    pub drops: Vec<RawDrop>,
}

impl RawBatch {
    pub fn new(_at: Instant) -> RawBatch {
        RawBatch {
            cgroups: vec![],
            ooms: vec![],
            signals: vec![],
            exits: vec![],
            throttles: vec![],
            conns: vec![],
            drops: vec![],
        }
    }

    pub fn len(&self) -> usize {
        self.cgroups.len()
            + self.ooms.len()
            + self.signals.len()
            + self.exits.len()
            + self.throttles.len()
            + self.conns.len()
            + self.drops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cgroups whose tasks the batch's events name.
    pub fn cgroup_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.exits
            .iter()
            .map(|e| e.cgroup_id)
            .chain(
                self.signals
                    .iter()
                    .flat_map(|s| [s.sender.cgroup_id, s.target.cgroup_id]),
            )
            .chain(self.throttles.iter().map(|t| t.cgroup_id))
            .chain(self.ooms.iter().map(|o| o.victim_cgroup_id))
    }
}

/// Attributes a batch and runs forensics over it: creations were applied
/// at drain time, first execs and removals are applied here, removals last.
pub fn process(
    b: RawBatch,
    resolver: &mut Resolver,
    forensics: &mut Forensics,
    services: &ServiceMap,
    seen: &mut Seen,
    dying: &mut DyingEndpoints,
) -> Vec<Event> {
    for c in &b.cgroups {
        if let CgroupOp::FirstExec { tgid } = c.op {
            forensics.on_first_exec(resolver, c.id, tgid);
            dying.on_start(&resolver.identify(c.id));
        }
    }
    for oom in b.ooms {
        forensics.on_oom(resolver, oom);
    }
    let mut events = Vec::with_capacity(b.exits.len() + b.signals.len());
    for mut sig in b.signals {
        sig.sender.pod = resolver.identify(sig.sender.cgroup_id);
        sig.target.pod = resolver.identify(sig.target.cgroup_id);
        forensics.on_signal(&sig);
        if sig.signo == 15 {
            dying.on_sigterm(&sig.target.pod, sig.ts);
        }
        events.push(Event::Signal(sig));
    }
    for mut exit in b.exits {
        exit.pod = resolver.identify(exit.cgroup_id);
        forensics.on_exit(resolver, &exit);
        events.push(Event::Exit(exit));
    }
    for mut t in b.throttles {
        t.pod = resolver.identify(t.cgroup_id);
        events.push(Event::Throttle(t));
    }
    for c in &b.cgroups {
        if c.op == CgroupOp::Removed {
            resolver.cgroup_removed(c.id);
            forensics.on_removed(c.id);
        }
    }
    let first_net = events.len();
    net(
        &b.conns,
        &b.drops,
        resolver,
        services,
        seen,
        dying,
        &mut events,
    );
    forensics.on_net_events(resolver, &events[first_net..]);
    events.extend(findings(forensics, resolver, dying, Instant::now()));
    events
}

/// What forensics has ready to publish. A finished record gets at once the
/// connections its pod received after SIGTERM (its exit closes the pod's
/// dying window, which a restart right after may open anew), then waits
/// for the runtime's report of the end; the rest goes out now.
pub fn findings(
    forensics: &mut Forensics,
    resolver: &Resolver,
    dying: &mut DyingEndpoints,
    now: Instant,
) -> Vec<Event> {
    let mut out = vec![];
    for f in forensics.take_findings(resolver, now) {
        match f {
            Finding::Termination(mut t) => {
                dying.on_exit(&t.pod, t.finished_at);
                t.late_connections = dying.late_connections(&t.pod, t.finished_at);
                forensics.await_runtime(t);
            }
            Finding::BackgroundDeath(d) => out.push(Event::BackgroundDeath(*d)),
            Finding::Oom(o) => out.push(Event::Oom(*o)),
            Finding::Respawn(r) => out.push(Event::Respawn(*r)),
        }
    }
    out.extend(
        forensics
            .released(resolver, now)
            .into_iter()
            .map(Event::Termination),
    );
    out
}

/// New connections and drops, attributed to pods, Services and endpoints.
fn net(
    conns: &[RawConn],
    drops: &[RawDrop],
    resolver: &mut Resolver,
    services: &ServiceMap,
    seen: &mut Seen,
    dying: &mut DyingEndpoints,
    events: &mut Vec<Event>,
) {
    let mut by_socket = vec![];
    {
        let pod_of = |ip| resolver.pod_by_ip(ip);
        for c in conns {
            let mut conn = net::connection(c, services, &pod_of);
            dying.classify(&mut conn);
            // No pod has the source address (the node's own: a hostNetwork
            // pod): the sending socket's cgroup names the container, below.
            if conn.pod.pod.is_none() && c.cgroup_id != 0 {
                by_socket.push((events.len(), c.cgroup_id));
            }
            events.push(Event::Connection(conn));
        }
        for d in drops {
            let (drop, conn) = net::drop_events(d, services, &pod_of);
            events.push(Event::Drop(drop));
            if let (Some(conn), Some(t)) = (conn, d.tuple)
                && seen.first(t)
            {
                events.push(Event::Connection(conn));
            }
        }
    }
    for (i, cgroup_id) in by_socket {
        let pod = resolver.identify(cgroup_id);
        if let Some(Event::Connection(conn)) = events.get_mut(i) {
            conn.pod = pod;
        }
    }
}
