//! Submitting to a ring buffer without waking the reader for every event.
//!
//! A wakeup per event costs the traced workload an irq_work (a self-IPI,
//! a VM exit in a guest) and the reader a context switch per event: most of
//! a tracer's overhead in an exit storm. The reader is woken each time the
//! unread data grows past another multiple of `RINGBUF_WAKEUP_BYTES`, once
//! per multiple, never per event; userspace also drains on a short timer,
//! which bounds the latency.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    maps::{RingBuf, ring_buf::RingBufEntry},
};

/// Set by userspace (a power of two); 0 wakes the reader for every event.
#[unsafe(no_mangle)]
static RINGBUF_WAKEUP_BYTES: u64 = 0;

/// The ring buffer's header before each record (`BPF_RINGBUF_HDR_SZ`).
const RECORD_HEADER: u64 = 8;

/// Submits `entry`, reserved in `ring`, waking the reader only when it
/// carries the unread data across a multiple of the threshold.
#[inline(always)]
pub fn submit<T>(ring: &RingBuf, entry: RingBufEntry<T>) {
    entry.submit(wakeup_flags(ring, size_of::<T>()));
}

/// The flags for submitting a reserved record of `size` bytes.
///
/// Waking for every record once the threshold is passed (the first
/// version) made every event of a storm an irq_work as soon as the reader
/// fell behind: a third of the signal probe's cost in a kill storm.
#[inline(always)]
fn wakeup_flags(ring: &RingBuf, size: usize) -> u64 {
    // SAFETY: a volatile read keeps the load-time value from being folded.
    let threshold = unsafe { core::ptr::read_volatile(&RINGBUF_WAKEUP_BYTES) };
    if threshold == 0 {
        return BPF_RB_FORCE_WAKEUP as u64;
    }
    // Rings differ in size: never wait for more than an eighth of this one,
    // or a small ring would fill before its reader is woken. Both are
    // powers of two, so the smaller one is too.
    let threshold = threshold.min(ring.query(BPF_RB_RING_SIZE as u64) / 8);
    // The reservation already advanced the producer: the unread data
    // includes this record (and any other CPU's reserved since).
    let after = ring.query(BPF_RB_AVAIL_DATA as u64);
    let before = after.saturating_sub(RECORD_HEADER + (size as u64).next_multiple_of(8));
    // Crossed a multiple of a power of two: a bit at or above it changed.
    if (before ^ after) >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}
