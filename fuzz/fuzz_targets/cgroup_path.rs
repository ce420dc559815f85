//! Cgroup paths as the kernel reports them at cgroup_mkdir (any bytes a
//! runtime or a hostile workload manager may create).
#![no_main]

use libfuzzer_sys::fuzz_target;
use podscope::metadata::cgroup_path::parse;

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    let _ = parse(&path);
});
