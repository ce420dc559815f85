//! Reads of kernel memory at offsets resolved by userspace from BTF.

use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf, generated};

/// How a program reads the kernel's structures, so that one body serves
/// the hook types that allow plain loads and those that do not.
pub trait Access {
    /// A `T` at `base + offset`; `Err` when the read faulted.
    fn read<T: Copy>(base: *const u8, offset: u32) -> Result<T, i32>;
}

/// `bpf_probe_read_kernel`: any program type, any address (a helper call each).
pub struct Probed;

/// Plain loads from a BTF-typed pointer (`bpf_get_current_task_btf()` and
/// the pointers read from it), which the verifier turns into loads that
/// read 0 on a fault: no helper call (tp_btf and raw_tp programs). The
/// offsets must be load-time constants (a frozen global), and a fault
/// cannot be told from a 0.
pub struct Typed;

impl Access for Probed {
    #[inline(always)]
    fn read<T: Copy>(base: *const u8, offset: u32) -> Result<T, i32> {
        read(base, offset)
    }
}

impl Access for Typed {
    #[inline(always)]
    fn read<T: Copy>(base: *const u8, offset: u32) -> Result<T, i32> {
        // SAFETY: the verifier only accepts this load from a BTF-typed
        // pointer at an offset inside the type, and makes a fault read 0.
        Ok(unsafe {
            base.wrapping_add(offset as usize)
                .cast::<T>()
                .read_volatile()
        })
    }
}

/// Reads a `T` at `base + offset`.
#[inline(always)]
pub fn read<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel tolerates any address and reports a fault
    // as an error instead of dereferencing it directly.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }
}

/// Reads a pointer at `base + offset`.
#[inline(always)]
pub fn read_ptr(base: *const u8, offset: u32) -> Result<*const u8, i32> {
    read::<*const u8>(base, offset)
}

/// Copies `dst.len()` bytes from `base + offset`.
#[inline(always)]
pub fn read_buf(base: *const u8, offset: u32, dst: &mut [u8]) -> Result<(), i32> {
    // SAFETY: as for `read`.
    unsafe { bpf_probe_read_kernel_buf(base.wrapping_add(offset as usize), dst) }
}

/// Copies a `T` from `base + offset` straight into `dst`, typically a field
/// of a reserved ring buffer entry: no copy through the stack. On a fault the
/// kernel zero-fills `dst`; the result says whether the read succeeded.
///
/// # Safety
/// `dst` must point to `size_of::<T>()` writable bytes the program owns.
#[inline(always)]
pub unsafe fn read_into<T>(base: *const u8, offset: u32, dst: *mut T) -> bool {
    // SAFETY: as for `read`; the caller vouches for `dst`.
    unsafe {
        generated::bpf_probe_read_kernel(
            dst.cast(),
            size_of::<T>() as u32,
            base.wrapping_add(offset as usize).cast(),
        ) == 0
    }
}
