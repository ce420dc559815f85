//! The termination journal's health: what it wrote, what waits in memory
//! because the disk refused it, and what opening it had to cut or skip; and
//! the in-memory store beside it: its bytes and what its limits dropped.

use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

use crate::forensics::store::JournalStats;

/// (counter, its name, help) for each cumulative count of [`JournalStats`].
const COUNTERS: [(&str, &str); 6] = [
    (
        "journal_records_written",
        "Termination records written durably to the journal in the state directory",
    ),
    (
        "journal_write_errors",
        "Failed journal writes (disk full, I/O error); the record waits in memory and is retried",
    ),
    (
        "journal_rotation_errors",
        "Failed rotations of the journal's files; retried at the next record",
    ),
    (
        "journal_records_lost",
        "Termination records that never reached the disk because the in-memory queue behind a failing disk was full",
    ),
    (
        "journal_recovered_dropped_bytes",
        "Bytes of a torn write (agent killed while writing) cut off the journal at start-up",
    ),
    (
        "journal_recovered_skipped_bytes",
        "Bytes of corrupt frames in the middle of the journal skipped at start-up (later records kept)",
    ),
];

pub struct JournalMetrics {
    counters: Vec<Counter>,
    seen: [u64; 6],
    pending: Gauge,
    store_bytes: Gauge,
    store_evicted: Counter,
    store_evicted_seen: u64,
}

impl JournalMetrics {
    pub fn register(registry: &mut Registry) -> JournalMetrics {
        let counters = COUNTERS
            .iter()
            .map(|(name, help)| {
                let c = Counter::default();
                registry.register(*name, *help, c.clone());
                c
            })
            .collect();
        let pending = Gauge::default();
        registry.register(
            "journal_pending_records",
            "Termination records waiting in memory because the journal cannot be written (disk full, I/O error)",
            pending.clone(),
        );
        let store_bytes = Gauge::default();
        registry.register(
            "termination_store_bytes",
            "Estimated bytes of termination records, background deaths and respawn counts the agent keeps in memory for why and the API",
            store_bytes.clone(),
        );
        let store_evicted = Counter::default();
        registry.register(
            "termination_store_evicted",
            "Termination records, background deaths and respawn counts dropped from memory to stay within --records-memory-bytes (oldest first; the journal keeps its own history)",
            store_evicted.clone(),
        );
        JournalMetrics {
            counters,
            seen: [0; 6],
            pending,
            store_bytes,
            store_evicted,
            store_evicted_seen: 0,
        }
    }

    pub fn update(&mut self, j: &JournalStats) {
        let now = [
            j.written.load(Relaxed),
            j.errors.load(Relaxed),
            j.rotation_errors.load(Relaxed),
            j.lost.load(Relaxed),
            j.recovered_dropped_bytes.load(Relaxed),
            j.recovered_skipped_bytes.load(Relaxed),
        ];
        for ((c, seen), now) in self.counters.iter().zip(&mut self.seen).zip(now) {
            c.inc_by(now.saturating_sub(*seen));
            *seen = now;
        }
        self.pending
            .set(i64::try_from(j.pending.load(Relaxed)).unwrap_or(i64::MAX));
    }

    pub fn update_store(&mut self, bytes: usize, evicted: u64) {
        self.store_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.store_evicted
            .inc_by(evicted.saturating_sub(self.store_evicted_seen));
        self.store_evicted_seen = evicted;
    }
}
