//! tracefs, where plain tracepoints are found by name.

use std::path::Path;

pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

fn populated(p: &str) -> bool {
    Path::new(p).join("events").is_dir()
}

/// Where tracefs is mounted, if it is.
pub fn mounted() -> Option<&'static str> {
    [TRACEFS, DEBUGFS_TRACING]
        .into_iter()
        .find(|p| populated(p))
}

/// Makes sure tracefs is mounted, mounting it at its standard place (as
/// systemd does on most distributions) when it is not. Plain tracepoints
/// cannot be attached without it; tp_btf and raw_tp can.
pub fn ensure_mounted() -> Result<&'static str, String> {
    if let Some(p) = mounted() {
        return Ok(p);
    }
    let ret = {
        let (src, target, fstype) = (c"nodev", c"/sys/kernel/tracing", c"tracefs");
        // SAFETY: valid NUL-terminated strings; no data argument.
        unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        }
    };
    if ret != 0 || !populated(TRACEFS) {
        return Err(format!(
            "tracefs is not mounted and mounting it at {TRACEFS} failed ({}): mount it with `mount -t tracefs nodev {TRACEFS}`",
            std::io::Error::last_os_error()
        ));
    }
    tracing::info!("mounted tracefs at {TRACEFS} (plain tracepoints need it)");
    Ok(TRACEFS)
}
