//! kube-proxy's rules as `iptables-save` prints them: any text, and the
//! lookups the agent then makes, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podscope::net::iptables;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let map = iptables::parse(&text);
    for dst in ["198.19.0.10:80", "[2001:db8::1]:443", "198.18.0.3:30080"] {
        if let Ok(a) = dst.parse() {
            for proto in [6, 17, 132] {
                let _ = map.lookup(proto, a);
            }
        }
    }
    let _ = map.len();
});
