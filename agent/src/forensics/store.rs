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
    records: Bounded<TerminationRecord>,
    deaths: Bounded<BackgroundDeath>,
    /// The latest count of each respawning command (container, parent,
    /// command), least recently updated first.
    respawns: Bounded<RespawnReport>,
}

/// What the store may hold: a DaemonSet's memory must stay flat for months,
/// so the lists are capped by an estimate of their bytes as well as by count
/// (records differ in size by their evidence: a probe's connections, a hook's
/// timeline). The journal on disk keeps its own, larger history.
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    /// Termination records at most.
    pub records: usize,
    /// Bytes at most for the termination records; background deaths get a
    /// quarter of it and respawn counts a sixteenth.
    pub bytes: usize,
}

impl Default for StoreLimits {
    /// The agent's defaults: the byte budget binds long before the count.
    fn default() -> StoreLimits {
        StoreLimits {
            records: 10_000,
            bytes: 4 << 20,
        }
    }
}

/// A queue that drops its oldest items beyond a count or a byte estimate.
///
/// Items are boxed: a record is some 800 bytes inline, and a deque of
/// inline records at its cap walks its head through a buffer of up to twice
/// the cap (the capacity doubles past a power of two), touching a page more
/// at every push until it wraps. Measured in the 40-minute soak: RSS grew
/// 1.7 MiB in the 9 minutes after the budget was reached. Boxed, the deque
/// is 16 bytes a slot and the records' memory is what the budget counts.
struct Bounded<T> {
    items: VecDeque<(Box<T>, usize)>,
    bytes: usize,
    max_items: usize,
    max_bytes: usize,
    evicted: u64,
}

impl<T: Serialize> Bounded<T> {
    fn new(max_items: usize, max_bytes: usize) -> Bounded<T> {
        Bounded {
            items: VecDeque::new(),
            bytes: 0,
            max_items: max_items.max(1),
            max_bytes,
            evicted: 0,
        }
    }

    fn push(&mut self, item: T) {
        let b = footprint(&item);
        self.items.push_back((Box::new(item), b));
        self.bytes += b;
        // The newest item stays even when it alone is over the budget.
        while self.items.len() > self.max_items
            || (self.bytes > self.max_bytes && self.items.len() > 1)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, b)) = self.items.pop_front() {
            self.bytes -= b;
            self.evicted += 1;
        }
    }

    fn remove(&mut self, i: usize) {
        if let Some((_, b)) = self.items.remove(i) {
            self.bytes -= b;
        }
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = &T> {
        self.items.iter().map(|(t, _)| &**t)
    }
}

/// The memory an item holds, estimated: its inline size and its JSON
/// length, which tracks the strings and lists it owns (field names stand in
/// for the allocator's per-allocation overhead).
fn footprint<T: Serialize>(item: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, item);
    std::mem::size_of::<T>() + c.0
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
    pub fn new(limits: StoreLimits) -> TerminationStore {
        TerminationStore {
            records: Bounded::new(limits.records, limits.bytes),
            deaths: Bounded::new(limits.records, limits.bytes / 4),
            respawns: Bounded::new(limits.records / 8, limits.bytes / 16),
        }
    }

    pub fn add(&mut self, r: TerminationRecord) {
        self.records.push(r);
    }

    pub fn add_death(&mut self, d: BackgroundDeath) {
        self.deaths.push(d);
    }

    /// A respawn's latest count replaces the one it updates.
    pub fn add_respawn(&mut self, r: RespawnReport) {
        let same = |x: &RespawnReport| {
            x.pod.container_id == r.pod.container_id
                && x.respawn.parent_pid == r.respawn.parent_pid
                && x.respawn.command == r.respawn.command
        };
        let found = self.respawns.iter().position(same);
        if let Some(i) = found {
            self.respawns.remove(i);
        }
        self.respawns.push(r);
    }

    /// The estimated bytes held, and the items dropped to stay within the
    /// limits since start-up (exported: an SRE sees the store is full).
    pub fn usage(&self) -> (usize, u64) {
        let (r, d, x) = (&self.records, &self.deaths, &self.respawns);
        (
            r.bytes + d.bytes + x.bytes,
            r.evicted + d.evicted + x.evicted,
        )
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
        self.records.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.items.is_empty()
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
/// only and counted as lost to the journal. The channel holds boxes: its
/// slots are allocated and written when it is made, and 4,096 inline
/// records were 3.6 MiB of the agent's heap from start-up on (heaptrack,
/// the largest single allocation), where boxes are 64 KiB.
const JOURNAL_QUEUE: usize = 4096;

/// Queues records for the journal's thread, from the task that consumes them.
pub struct JournalHandle {
    tx: mpsc::SyncSender<Box<TerminationRecord>>,
    stats: Arc<JournalStats>,
}

impl JournalHandle {
    /// Queues a record; never blocks.
    pub fn write(&self, r: TerminationRecord) {
        if self.tx.try_send(Box::new(r)).is_err() {
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends records to the journal's thread.
pub struct JournalWriter {
    tx: mpsc::SyncSender<Box<TerminationRecord>>,
    done: mpsc::Receiver<()>,
    pub stats: Arc<JournalStats>,
}

impl JournalWriter {
    pub fn spawn(mut journal: Journal, stats: Arc<JournalStats>) -> std::io::Result<JournalWriter> {
        let (tx, rx) = mpsc::sync_channel::<Box<TerminationRecord>>(JOURNAL_QUEUE);
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
        if self.tx.try_send(Box::new(r)).is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forensics::journal::tests::record;

    fn store(records: usize, bytes: usize) -> TerminationStore {
        TerminationStore::new(StoreLimits { records, bytes })
    }

    #[test]
    fn the_oldest_records_go_beyond_the_count() {
        let mut s = store(3, usize::MAX);
        for n in 0..5 {
            s.add(record(n));
        }
        let pids: Vec<u32> = s.records.iter().map(|r| r.pid).collect();
        assert_eq!(pids, [2, 3, 4]);
        assert_eq!(s.usage().1, 2);
    }

    #[test]
    fn the_byte_budget_holds_however_many_records_come() {
        let one = footprint(&record(0));
        let mut s = store(10_000, 10 * one);
        for n in 0..1_000 {
            s.add(record(n));
        }
        let (bytes, evicted) = s.usage();
        assert!(bytes <= 10 * one, "{bytes} > {}", 10 * one);
        assert!((9..=10).contains(&s.len()), "{}", s.len());
        assert_eq!(evicted, 1_000 - s.len() as u64);
        // The newest stay.
        assert_eq!(s.records.iter().last().unwrap().pid, 999);
    }

    #[test]
    fn a_big_record_pushes_out_more_small_ones() {
        let one = footprint(&record(0));
        let mut s = store(100, 10 * one);
        for n in 0..10 {
            s.add(record(n));
        }
        let mut big = record(100);
        big.explanation = "x".repeat(4 * one);
        s.add(big);
        assert!(s.usage().0 <= 10 * one);
        assert!(s.len() <= 6, "{}", s.len());
        // Alone over the budget, the newest record still stays.
        let mut huge = record(101);
        huge.explanation = "x".repeat(20 * one);
        s.add(huge);
        assert_eq!(s.len(), 1);
        assert_eq!(s.records.iter().last().unwrap().pid, 101);
    }

    #[test]
    fn removing_an_item_gives_its_bytes_back() {
        let mut b = Bounded::new(10, 1 << 20);
        b.push(record(1));
        b.push(record(2));
        let two = b.bytes;
        b.remove(0);
        assert_eq!(b.bytes, two - footprint(&record(1)));
        assert_eq!(b.evicted, 0, "an update is not an eviction");
    }
}
