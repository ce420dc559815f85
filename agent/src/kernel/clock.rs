//! Turning the kernel's boot-time nanoseconds into wall-clock time.
//!
//! eBPF programs stamp events with `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME,
//! which keeps counting through suspend); users want RFC 3339.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Converts boot-time stamps to wall-clock time. The offset is taken once:
/// a later jump of the wall clock (NTP step) shifts new events, not old ones.
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    /// Wall-clock ns since the epoch at boot.
    boot_epoch_ns: u64,
}

impl BootClock {
    pub fn new() -> BootClock {
        let (real, boot) = (clock_ns(libc::CLOCK_REALTIME), boot_ns());
        BootClock {
            boot_epoch_ns: real.saturating_sub(boot),
        }
    }

    /// A boot-clock stamp as wall time. Stamps come from ring-buffer
    /// records: a corrupt one saturates (year 2554) instead of overflowing.
    pub fn to_system_time(&self, boot_ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.boot_epoch_ns.saturating_add(boot_ns))
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
