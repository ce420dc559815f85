//! Processes a supervisor inside the container keeps restarting:
//! supervisord, runit, a shell loop. Kubernetes counts restarts of the
//! container (PID 1) only; a worker that crashes and is started again every
//! second under a living PID 1 leaves `restartCount` at 0.
//!
//! From the kernel's side: the same command (comm) exits again and again
//! with the same parent, which lives on. Every exit after the first under
//! that parent means the parent had started it again: `exits - 1` respawns
//! are observed (the instance running now, if any, is not counted: only
//! exits are seen). Counted only once it failed (non-zero exit or a signal):
//! a loop that runs a short command that succeeds (`date`, a health check)
//! is normal work, not a respawn worth telling.

use std::{collections::VecDeque, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::record::time;
use crate::metadata::PodIdentity;

/// Commands tracked per container: a supervisor runs a handful; the
/// least-exited entry goes first when a new one comes (this bounds the
/// metric's `command` label too).
pub const COMMANDS_KEPT: usize = 8;

/// One command restarted under one parent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Respawn {
    /// The command as the kernel names it (comm, 15 bytes at most).
    pub command: String,
    pub parent_pid: u32,
    pub parent_comm: String,
    /// The parent is the container's main process (PID 1).
    pub parent_is_main: bool,
    /// Times it ended under this parent.
    pub exits: u64,
    /// Of which failed: a non-zero exit code or a signal.
    pub failed_exits: u64,
    /// Respawns seen: every exit after the first (observed).
    pub respawns: u64,
    pub last_exit_code: Option<u8>,
    pub last_signal: Option<String>,
    #[serde(with = "time")]
    pub first_exit_at: SystemTime,
    #[serde(with = "time")]
    pub last_exit_at: SystemTime,
}

impl Respawn {
    /// Worth telling: restarted at least once, and failing.
    pub fn reported(&self) -> bool {
        self.respawns >= 1 && self.failed_exits >= 1
    }
}

/// A respawn as it happens, for `why` while the container still runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RespawnReport {
    #[serde(flatten)]
    pub pod: PodIdentity,
    /// The container's main process, and whether it was alive at this exit.
    pub main_pid: Option<u32>,
    pub main_alive: bool,
    #[serde(flatten)]
    pub respawn: Respawn,
}

/// An exit of a process that is neither the main one nor a runtime exec.
pub struct ChildExit<'a> {
    pub comm: &'a str,
    pub ppid: u32,
    pub parent_comm: &'a str,
    pub exit_code: Option<u8>,
    pub signal: Option<&'a str>,
    pub at: SystemTime,
}

/// The commands of one container.
#[derive(Default)]
pub struct Respawns {
    entries: VecDeque<Respawn>,
}

impl Respawns {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Counts an exit; returns the entry when it is now worth telling.
    pub fn on_exit(&mut self, e: &ChildExit, main: Option<u32>) -> Option<&Respawn> {
        if e.ppid == 0 || e.comm.is_empty() {
            return None;
        }
        let failed = e.signal.is_some() || e.exit_code.is_some_and(|c| c != 0);
        let i = match self
            .entries
            .iter()
            .position(|r| r.parent_pid == e.ppid && r.command == e.comm)
        {
            Some(i) => i,
            None => {
                if self.entries.len() == COMMANDS_KEPT
                    && let Some(victim) = self
                        .entries
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, r)| (r.exits, r.last_exit_at))
                        .map(|(i, _)| i)
                {
                    self.entries.remove(victim);
                }
                self.entries.push_back(Respawn {
                    command: e.comm.to_string(),
                    parent_pid: e.ppid,
                    parent_comm: e.parent_comm.to_string(),
                    parent_is_main: main == Some(e.ppid),
                    exits: 0,
                    failed_exits: 0,
                    respawns: 0,
                    last_exit_code: None,
                    last_signal: None,
                    first_exit_at: e.at,
                    last_exit_at: e.at,
                });
                self.entries.len() - 1
            }
        };
        let r = &mut self.entries[i];
        r.exits += 1;
        r.respawns = r.exits - 1;
        r.failed_exits += u64::from(failed);
        r.last_exit_code = e.exit_code;
        r.last_signal = e.signal.map(str::to_string);
        r.last_exit_at = e.at;
        (failed && r.reported()).then_some(&*r)
    }

    /// What to put in the container's termination record.
    pub fn reported(&self) -> Vec<Respawn> {
        self.entries
            .iter()
            .filter(|r| r.reported())
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit<'a>(comm: &'a str, ppid: u32, code: u8) -> ChildExit<'a> {
        ChildExit {
            comm,
            ppid,
            parent_comm: "sh",
            exit_code: Some(code),
            signal: None,
            at: SystemTime::now(),
        }
    }

    #[test]
    fn the_same_failing_command_under_the_same_parent_is_a_respawn() {
        let mut r = Respawns::default();
        assert!(r.on_exit(&exit("worker", 1, 1), Some(1)).is_none());
        let second = r.on_exit(&exit("worker", 1, 1), Some(1)).cloned().unwrap();
        assert_eq!((second.exits, second.respawns), (2, 1));
        assert!(second.parent_is_main);
        // One-shot children of ever-new parents (a `sleep` in each worker)
        // are no respawn, nor is a loop of commands that succeed.
        for ppid in 10..20 {
            assert!(r.on_exit(&exit("sleep", ppid, 0), Some(1)).is_none());
        }
        for _ in 0..3 {
            assert!(r.on_exit(&exit("date", 1, 0), Some(1)).is_none());
        }
        // The table is bounded; the respawning worker outlives the one-shots.
        let kept = r.reported();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(kept[0].command, "worker");
        assert!(r.entries.len() <= COMMANDS_KEPT);
    }
}
