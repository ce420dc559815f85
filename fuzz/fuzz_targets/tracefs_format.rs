//! tracefs `format` files, and the offsets the agent takes from them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podscope::{kernel::tracefs::TracepointFormat, probes::oom::offsets_from_format};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(f) = TracepointFormat::parse(&text) {
        for field in ["comm", "pid", "total_vm", "common_pid", "reason"] {
            let _ = f.offset(field);
        }
        let _ = offsets_from_format(&f);
    }
});
