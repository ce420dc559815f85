//! What the agent remembers of terminations and background deaths, for
//! `/api/v1/terminations` and `podscope why`: bounded, newest kept, filled
//! from the journal at start-up. The journal writes happen on a thread of
//! their own: an fdatasync must not stall the event loop.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Duration,
};

use serde::Serialize;

use super::{
    BackgroundDeath,
    journal::{Journal, MAX_PENDING},
    record::TerminationRecord,
    respawn::RespawnReport,
};
use crate::events::Filter;

pub struct TerminationStore {
    records: VecDeque<TerminationRecord>,
    deaths: VecDeque<BackgroundDeath>,
    /// The latest count of each respawning command (container, parent,
    /// command), least recently updated first.
    respawns: VecDeque<RespawnReport>,
    cap: usize,
}

/// The `/api/v1/terminations` answer.
#[derive(Serialize)]
pub struct Answer<'a> {
    /// Oldest first.
    pub terminations: Vec<&'a TerminationRecord>,
    /// Processes other than the main one that died while their container
    /// lived on (since the agent started), oldest first.
    pub background_deaths: Vec<&'a BackgroundDeath>,
}

impl TerminationStore {
    pub fn new(cap: usize) -> TerminationStore {
        TerminationStore {
            records: VecDeque::new(),
            deaths: VecDeque::new(),
            respawns: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    pub fn add(&mut self, r: TerminationRecord) {
        if self.records.len() == self.cap {
            self.records.pop_front();
        }
        self.records.push_back(r);
    }

    pub fn add_death(&mut self, d: BackgroundDeath) {
        if self.deaths.len() == self.cap {
            self.deaths.pop_front();
        }
        self.deaths.push_back(d);
    }

    /// A respawn's latest count replaces the one it updates.
    pub fn add_respawn(&mut self, r: RespawnReport) {
        let same = |x: &RespawnReport| {
            x.pod.container_id == r.pod.container_id
                && x.respawn.parent_pid == r.respawn.parent_pid
                && x.respawn.command == r.respawn.command
        };
        if let Some(i) = self.respawns.iter().position(same) {
            self.respawns.remove(i);
        } else if self.respawns.len() == self.cap {
            self.respawns.pop_front();
        }
        self.respawns.push_back(r);
    }

    /// The respawning commands of the containers that match, latest counts.
    pub fn respawns(&self, f: &Filter) -> Vec<RespawnReport> {
        self.respawns
            .iter()
            .filter(|r| f.matches(&r.pod))
            .cloned()
            .collect()
    }

    pub fn query(&self, f: &Filter) -> Answer<'_> {
        Answer {
            terminations: self.records.iter().filter(|r| f.matches(&r.pod)).collect(),
            background_deaths: self.deaths.iter().filter(|d| f.matches(&d.pod)).collect(),
        }
    }

    /// One page for `/api/v1/terminations`: the newest `limit` of each
    /// list that match and ended after `since`, oldest first, copied out
    /// (the caller serializes them after releasing the store).
    pub fn page(
        &self,
        f: &Filter,
        since: Option<std::time::SystemTime>,
        limit: usize,
    ) -> (Vec<TerminationRecord>, Vec<BackgroundDeath>) {
        let after = |t: std::time::SystemTime| since.is_none_or(|s| t > s);
        let mut records: Vec<TerminationRecord> = self
            .records
            .iter()
            .rev()
            .filter(|r| f.matches(&r.pod) && after(r.finished_at))
            .take(limit)
            .cloned()
            .collect();
        records.reverse();
        let mut deaths: Vec<BackgroundDeath> = self
            .deaths
            .iter()
            .rev()
            .filter(|d| f.matches(&d.pod) && after(d.ts))
            .take(limit)
            .cloned()
            .collect();
        deaths.reverse();
        (records, deaths)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Counters of the journal, exported as metrics.
#[derive(Default)]
pub struct JournalStats {
    pub written: AtomicU64,
    /// Failed write attempts (the record waits in memory and is retried).
    pub errors: AtomicU64,
    pub rotation_errors: AtomicU64,
    /// Records waiting in memory for the disk (a gauge).
    pub pending: AtomicU64,
    /// Records dropped from the full memory queue without reaching the disk.
    pub lost: AtomicU64,
    /// Bytes of torn writes cut off when the journal was opened.
    pub recovered_dropped_bytes: AtomicU64,
    /// Bytes of corrupt frames skipped between valid ones when it was opened.
    pub recovered_skipped_bytes: AtomicU64,
}

impl JournalStats {
    fn publish(&self, j: &Journal) {
        let c = &j.counts;
        self.written.store(c.written, Ordering::Relaxed);
        self.errors.store(c.write_errors, Ordering::Relaxed);
        self.rotation_errors
            .store(c.rotation_errors, Ordering::Relaxed);
        self.lost.store(c.lost, Ordering::Relaxed);
        self.pending.store(j.pending() as u64, Ordering::Relaxed);
        self.recovered_dropped_bytes
            .store(j.recovery.dropped_bytes, Ordering::Relaxed);
        self.recovered_skipped_bytes
            .store(j.recovery.skipped_bytes, Ordering::Relaxed);
    }
}

/// How often records waiting in memory are retried when no new one comes.
const RETRY: Duration = Duration::from_secs(10);

/// Records waiting for the journal's thread at most (it keeps its own
/// queue of records the disk refused); beyond, a record is kept in memory
/// only and counted as lost to the journal.
const JOURNAL_QUEUE: usize = 4096;

/// Queues records for the journal's thread, from the task that consumes them.
pub struct JournalHandle {
    tx: mpsc::SyncSender<TerminationRecord>,
    stats: Arc<JournalStats>,
}

impl JournalHandle {
    /// Queues a record; never blocks.
    pub fn write(&self, r: TerminationRecord) {
        if self.tx.try_send(r).is_err() {
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends records to the journal's thread.
pub struct JournalWriter {
    tx: mpsc::SyncSender<TerminationRecord>,
    done: mpsc::Receiver<()>,
    pub stats: Arc<JournalStats>,
}

impl JournalWriter {
    pub fn spawn(mut journal: Journal, stats: Arc<JournalStats>) -> std::io::Result<JournalWriter> {
        let (tx, rx) = mpsc::sync_channel::<TerminationRecord>(JOURNAL_QUEUE);
        let (done_tx, done) = mpsc::channel();
        let s = stats.clone();
        s.publish(&journal);
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || {
                let mut failing = false;
                loop {
                    let result = match rx.recv_timeout(RETRY) {
                        Ok(r) => journal.append(&r),
                        Err(mpsc::RecvTimeoutError::Timeout) => journal.flush(),
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            // Shutting down: one last try for what waits.
                            let _ = journal.flush();
                            s.publish(&journal);
                            break;
                        }
                    };
                    match result {
                        Ok(()) if failing => {
                            failing = false;
                            tracing::info!("the termination journal is written again; every record kept in memory meanwhile is on disk");
                        }
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!("{e}: records are kept in memory (up to {MAX_PENDING}) and written when the disk takes them again (podscope_journal_pending_records)");
                        }
                        _ => {}
                    }
                    s.publish(&journal);
                }
                let _ = done_tx.send(());
            })?;
        Ok(JournalWriter { tx, done, stats })
    }

    /// A handle that queues records, for the task that consumes them.
    pub fn handle(&self) -> JournalHandle {
        JournalHandle {
            tx: self.tx.clone(),
            stats: self.stats.clone(),
        }
    }

    /// Queues a record; never blocks.
    pub fn write(&self, r: TerminationRecord) {
        if self.tx.try_send(r).is_err() {
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lets the thread write what is queued and waits at most `deadline`;
    /// true when it finished in time (every handle must be gone first).
    pub fn close(self, deadline: Duration) -> bool {
        drop(self.tx);
        self.done.recv_timeout(deadline).is_ok()
    }
}
