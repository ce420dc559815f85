//! cgroup `cpu.stat` (v1 and v2) and `cpu.max`: any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podscope::kernel::cpu_stat::{parse_cpu_max, parse_stat};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_stat(&text, true);
    let _ = parse_stat(&text, false);
    let _ = parse_cpu_max(&text);
});
