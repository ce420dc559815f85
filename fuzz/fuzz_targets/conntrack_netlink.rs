//! ctnetlink datagrams (the conntrack event fallback): any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podscope::net::conntrack::parse_messages;

fuzz_target!(|data: &[u8]| {
    let _ = parse_messages(data);
});
