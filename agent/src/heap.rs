//! The agent's own heap, counted: a DaemonSet must stay flat for months,
//! and its resident size alone cannot tell a leak (live bytes growing) from
//! the allocator keeping freed pages (musl's and glibc's heaps fragment
//! under churn). [`Counting`] wraps the system allocator and keeps one
//! running total of the bytes allocated and not yet freed; the agent exports
//! it as `podscope_agent_heap_bytes` beside its resident size.
//!
//! The cost is one relaxed atomic add per allocation and per free, on a
//! counter that is only read once a second. Only the `podscope` binary
//! installs it (`main.rs`); in the kernel-test binaries and the unit tests
//! [`live_bytes`] is None.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, with the live bytes counted.
pub struct Counting;

// SAFETY: every call is passed to `System` unchanged; the counter only
// observes the sizes of what succeeded.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // On failure the old block stays allocated, and counted.
            if new_size >= layout.size() {
                LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

/// Bytes allocated and not freed, as the program asked for them (the
/// allocator's own overhead and retained free pages are not in it). None
/// when this binary does not count (nothing was ever counted).
pub fn live_bytes() -> Option<u64> {
    match LIVE.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counter follows allocations, growth, shrinking and frees exactly
    /// (a drift would read as a leak, or hide one).
    #[test]
    fn counts_what_is_live() {
        let before = LIVE.load(Ordering::Relaxed);
        let a = Counting;
        let layout = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: a valid, non-zero layout; each block freed with its size.
        unsafe {
            let p = a.alloc(layout);
            assert_eq!(LIVE.load(Ordering::Relaxed) - before, 1000);
            let p = a.realloc(p, layout, 5000);
            assert_eq!(LIVE.load(Ordering::Relaxed) - before, 5000);
            let bigger = Layout::from_size_align(5000, 8).unwrap();
            let p = a.realloc(p, bigger, 200);
            assert_eq!(LIVE.load(Ordering::Relaxed) - before, 200);
            a.dealloc(p, Layout::from_size_align(200, 8).unwrap());
            let z = a.alloc_zeroed(layout);
            assert_eq!(*z.add(999), 0);
            a.dealloc(z, layout);
        }
        assert_eq!(LIVE.load(Ordering::Relaxed), before);
    }
}
