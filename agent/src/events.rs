//! The typed events every consumer sees (CLI stream, later the daemon's
//! HTTP stream), one variant per family. JSON: one object per event with a
//! `kind` tag, the schema `podscope trace -o json` documents.

use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::{
    families::{Kernel, View},
    forensics::{BackgroundDeath, record::TerminationRecord, respawn::RespawnReport},
    probes::{exits::Exit, oom::OomKill, signals::Signal, throttle::Throttle},
};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Exit(Exit),
    /// A signal whose default action ends a process; belongs to its target.
    Signal(Signal),
    /// An OOM kill; belongs to its victim.
    Oom(OomKill),
    /// A container's end, explained (termination forensics).
    Termination(Box<TerminationRecord>),
    /// A process of a container died while the container lives on.
    BackgroundDeath(BackgroundDeath),
    /// A command restarted again inside a living container (a supervisor).
    Respawn(RespawnReport),
    /// A new connection's path through kube-proxy's rules (`trace net`).
    Connection(crate::net::Connection),
    /// A packet the kernel dropped, with its reason (`trace net`).
    Drop(crate::net::PacketDrop),
    /// A completed CFS throttle of a container on one CPU (`trace throttle`).
    Throttle(Throttle),
}

impl Event {
    /// Who the event belongs to.
    pub fn pod(&self) -> &crate::metadata::PodIdentity {
        match self {
            Event::Exit(e) => &e.pod,
            Event::Signal(s) => &s.target.pod,
            Event::Oom(o) => &o.pod,
            Event::Termination(t) => &t.pod,
            Event::BackgroundDeath(d) => &d.pod,
            Event::Respawn(r) => &r.pod,
            Event::Connection(c) => &c.pod,
            Event::Drop(d) => &d.pod,
            Event::Throttle(t) => &t.pod,
        }
    }

    /// The view (`trace <view>`) the event belongs to.
    pub fn view(&self) -> View {
        match self {
            Event::Exit(_) => View::Exits,
            Event::Signal(_) => View::Signals,
            Event::Oom(_) => View::Oom,
            Event::Termination(_) | Event::BackgroundDeath(_) | Event::Respawn(_) => {
                View::Terminations
            }
            Event::Connection(_) | Event::Drop(_) => View::Net,
            Event::Throttle(_) => View::Throttle,
        }
    }

    /// The `source` label of `podscope_events_total`: the kernel family that
    /// produced it, or the analysis that concluded it.
    pub fn source(&self) -> &'static str {
        match self {
            Event::Exit(_) => Kernel::Exits.name(),
            Event::Signal(_) => Kernel::Signals.name(),
            Event::Oom(_) => Kernel::Oom.name(),
            Event::Termination(_) => "terminations",
            Event::BackgroundDeath(_) => "background_deaths",
            Event::Respawn(_) => "respawns",
            Event::Connection(_) => Kernel::Netfilter.name(),
            Event::Drop(_) => Kernel::Drops.name(),
            Event::Throttle(_) => Kernel::Throttle.name(),
        }
    }

    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Writes the JSON form and a newline, without an intermediate String.
    pub fn write_json_line(&self, mut w: impl std::io::Write) -> std::io::Result<()> {
        serde_json::to_writer(&mut w, self)?;
        w.write_all(b"\n")
    }
}

/// Which events a consumer wants: the `trace` flags and the HTTP stream's
/// query parameters (`namespace`, `pod`, `container`).
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
}

impl Filter {
    pub fn matches(&self, id: &crate::metadata::PodIdentity) -> bool {
        let eq = |want: &Option<String>, have: &Option<std::sync::Arc<str>>| {
            want.as_deref().is_none_or(|w| have.as_deref() == Some(w))
        };
        eq(&self.namespace, &id.namespace)
            && eq(&self.pod, &id.pod)
            && eq(&self.container, &id.container)
    }
}

/// [`rfc3339`] of an optional time (skip it when absent).
pub fn rfc3339_opt<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_nanos(*t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_json_has_the_documented_fields() {
        let e = Event::Exit(Exit {
            ts: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            ts_boot_ns: 1,
            pid: 7,
            tgid: 7,
            ppid: 1,
            comm: "sh".into(),
            parent_comm: "containerd-shim".into(),
            exit_code: Some(3),
            signal: None,
            core_dumped: false,
            thread: false,
            lifetime_ns: 5,
            cgroup_id: 9,
            partial: false,
            pod: Default::default(),
        });
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["kind"], "exit");
        assert_eq!(v["ts"], "2023-11-14T22:13:20.123000000Z");
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["signal"], serde_json::Value::Null);
        for key in [
            "pid",
            "tgid",
            "ppid",
            "comm",
            "core_dumped",
            "thread",
            "cgroup_id",
            "lifetime_ns",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
    }
}
