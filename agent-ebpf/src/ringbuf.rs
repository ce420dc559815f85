//! Submitting to a ring buffer without waking the reader for every event.
//!
//! A wakeup per event costs the traced workload an irq_work and the reader a
//! context switch per event: most of a tracer's overhead in an exit storm.
//! Events are submitted silently until `RINGBUF_WAKEUP_BYTES` wait unread;
//! userspace also drains on a short timer, which bounds the latency.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    maps::RingBuf,
};

/// Set by userspace; 0 wakes the reader for every event.
#[unsafe(no_mangle)]
static RINGBUF_WAKEUP_BYTES: u64 = 0;

/// The flags for `submit`: wake the reader only once enough data waits.
#[inline(always)]
pub fn wakeup_flags(ring: &RingBuf) -> u64 {
    // SAFETY: a volatile read keeps the load-time value from being folded.
    let threshold = unsafe { core::ptr::read_volatile(&RINGBUF_WAKEUP_BYTES) };
    // Rings differ in size: never wait for more than an eighth of this one,
    // or a small ring would fill before its reader is woken.
    let threshold = threshold.min(ring.query(BPF_RB_RING_SIZE as u64) / 8);
    if threshold == 0 || ring.query(BPF_RB_AVAIL_DATA as u64) >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}
