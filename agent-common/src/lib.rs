//! Types shared by podscope's eBPF programs (`agent-ebpf`) and its userspace
//! (`agent`). Everything here is `#[repr(C)]`, fixed-size and `no_std`, because
//! the kernel side writes these bytes and the user side reads them back.
//!
//! One module per event family, named as in every other layer.
#![no_std]

pub mod cgroups;
pub mod exits;
pub mod net;
pub mod oom;
pub mod signals;
pub mod stats;
pub mod throttle;

/// Length of `task_struct.comm`, including the NUL.
pub const TASK_COMM_LEN: usize = 16;

/// Marks an optional kernel offset that this kernel's BTF does not have.
pub const OFFSET_ABSENT: u32 = u32::MAX;
