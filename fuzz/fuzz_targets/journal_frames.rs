//! The termination journal's frames: whatever bytes are on disk, reading
//! resynchronizes and never panics; valid frames come back exact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podscope::forensics::journal::parse;

fuzz_target!(|data: &[u8]| {
    let p = parse(data);
    assert!(p.end <= data.len());
    assert!(p.skipped as usize <= p.end);
});
