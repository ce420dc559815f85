//! Per-family counters kept by each eBPF program in a per-CPU array, so that
//! nothing the kernel side sees or drops goes uncounted. Userspace sums the
//! CPUs and exports the totals.

/// The probe fired. A family whose every path ends in exactly one of
/// emitted, lost or filtered may leave it at 0 (the signal probe does, to
/// spare its hot path a counter): userspace takes the larger of this and
/// their sum.
pub const STAT_HITS: u32 = 0;
/// An event was written to the ring buffer.
pub const STAT_EMITTED: u32 = 1;
/// The ring buffer was full: the event is lost.
pub const STAT_LOST: u32 = 2;
/// A kernel read failed: the event was sent with the fields it could read.
pub const STAT_READ_ERRORS: u32 = 3;
/// Filtered out on purpose in the kernel (not a loss), e.g. the other threads
/// of a process that is exiting as a whole.
pub const STAT_FILTERED: u32 = 4;
/// Number of slots in each family's stats array.
pub const STAT_SLOTS: u32 = 8;
