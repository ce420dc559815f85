//! kube-proxy's nftables mode as `nft -j list table` prints it: any bytes
//! (as one or two listings), and the lookups the agent then makes, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podscope::net::nftables;

fuzz_target!(|data: &[u8]| {
    // The ip and ip6 listings: split at the first NUL, as two documents.
    let parts: Vec<&[u8]> = data.splitn(2, |b| *b == 0).collect();
    if let Ok((map, _)) = nftables::parse(&parts) {
        for dst in ["198.19.0.41:80", "[2001:db8::1]:443", "198.18.0.2:3003"] {
            if let Ok(a) = dst.parse() {
                for proto in [6, 17, 132] {
                    let _ = map.lookup(proto, a);
                }
            }
        }
        let _ = map.len();
    }
});
