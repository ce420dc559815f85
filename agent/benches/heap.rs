//! What counting the heap costs (`podscope::heap::Counting`, the `podscope`
//! binary's global allocator): an allocation and its free through the
//! system allocator alone and through the counting wrapper, side by side
//! in one run, on one thread and on two at once (the agent's drain thread
//! and its tokio workers share the one counter). Run by `cargo xtask bench
//! agent`; prints one `key=value` line per figure.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    time::Instant,
};

use podscope::heap::Counting;

/// Pairs per measurement, per thread.
const PAIRS: usize = 4_000_000;
/// Sizes the agent allocates most: small strings and event structs, a
/// label set, a batch buffer.
const SIZES: [usize; 4] = [24, 96, 512, 4096];

/// Nanoseconds per alloc+free pair, over every size in turn.
fn pairs<A: GlobalAlloc>(a: &A) -> f64 {
    let layouts: Vec<Layout> = SIZES
        .iter()
        .map(|&s| Layout::from_size_align(s, 8).unwrap())
        .collect();
    let t = Instant::now();
    for i in 0..PAIRS {
        let l = layouts[i % layouts.len()];
        // SAFETY: a non-zero layout; the block is freed with the same layout.
        unsafe {
            let p = a.alloc(l);
            assert!(!p.is_null());
            black_box(p);
            a.dealloc(p, l);
        }
    }
    t.elapsed().as_nanos() as f64 / PAIRS as f64
}

/// The same on `threads` threads at once; the mean of their figures.
fn pairs_on<A: GlobalAlloc + Sync>(a: &A, threads: usize) -> f64 {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads).map(|_| s.spawn(|| pairs(a))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum::<f64>() / threads as f64
    })
}

fn main() {
    // Warm both paths (the system allocator's caches, page faults).
    pairs(&System);
    pairs(&Counting);
    // Alternate the two, best of three each, so that neither gets the
    // quieter moments of a shared machine.
    for threads in [1usize, 2] {
        let (mut plain, mut counted) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            plain = plain.min(pairs_on(&System, threads));
            counted = counted.min(pairs_on(&Counting, threads));
        }
        println!(
            "threads={threads} system_ns_per_pair={plain:.1} counting_ns_per_pair={counted:.1} added_ns_per_pair={:.1} ratio={:.2}",
            counted - plain,
            counted / plain
        );
    }
}
