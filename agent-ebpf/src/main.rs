//! podscope's kernel side. One module per event family; every module owns its
//! programs, its maps and its per-CPU stats, and shares its event type with
//! userspace through `agent-common`.
#![no_std]
#![no_main]

mod cgroups;
mod doctor;
mod exits;
mod kmem;
mod net;
mod oom;
mod ringbuf;
mod signals;
mod stats;
mod throttle;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; there is no unwinding in BPF.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
