//! Turning the kernel's boot-time nanoseconds into wall-clock time.
//!
//! eBPF programs stamp events with `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME,
//! which keeps counting through suspend); users want RFC 3339.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; both clocks exist on every Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Nanoseconds since boot, as `bpf_ktime_get_boot_ns()` counts them.
pub fn boot_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// Wall-clock ns since the epoch at boot, shared by every [`BootClock`]:
/// [`resync`] re-reads it (the drain thread does, every second), so an NTP
/// step of the wall clock shifts timestamps from the next second on, not
/// until the agent restarts.
static BOOT_EPOCH_NS: AtomicU64 = AtomicU64::new(0);

/// Re-reads the wall clock's offset from the boot clock.
pub fn resync() {
    let (real, boot) = (clock_ns(libc::CLOCK_REALTIME), boot_ns());
    BOOT_EPOCH_NS.store(real.saturating_sub(boot), Ordering::Relaxed);
}

/// Converts boot-time stamps to wall-clock time with the offset last read
/// by [`resync`].
#[derive(Clone, Copy, Debug)]
pub struct BootClock(());

impl BootClock {
    pub fn new() -> BootClock {
        if BOOT_EPOCH_NS.load(Ordering::Relaxed) == 0 {
            resync();
        }
        BootClock(())
    }

    /// A boot-clock stamp as wall time. Stamps come from ring-buffer
    /// records: a corrupt one saturates (year 2554) instead of overflowing.
    pub fn to_system_time(&self, boot_ns: u64) -> SystemTime {
        UNIX_EPOCH
            + Duration::from_nanos(
                BOOT_EPOCH_NS
                    .load(Ordering::Relaxed)
                    .saturating_add(boot_ns),
            )
    }
}

impl Default for BootClock {
    fn default() -> Self {
        BootClock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_stamp_of_now_is_now() {
        let clock = BootClock::new();
        let t = clock.to_system_time(boot_ns());
        let skew = SystemTime::now().duration_since(t).unwrap_or_default();
        assert!(skew < Duration::from_secs(1), "{skew:?}");
    }

    /// Found by the event_decoders fuzz target: any stamp converts.
    #[test]
    fn a_corrupt_stamp_saturates() {
        let t = BootClock::new().to_system_time(u64::MAX);
        assert_eq!(t, UNIX_EPOCH + Duration::from_nanos(u64::MAX));
    }
}
