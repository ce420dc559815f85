//! /proc/self/mountinfo: the cgroup layout (v1, v2, hybrid) found in any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podscope::kernel::cgroups::CgroupLayout;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let layout = CgroupLayout::from_mountinfo(&text);
    let _ = layout.name();
    let _ = layout.v2_root();
    let _ = layout.v1_controller("cpu");
});
